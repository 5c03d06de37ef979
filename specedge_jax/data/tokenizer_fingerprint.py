"""A tokenizer's fingerprint: what two processes compare to know they speak the same token ids.

A drafter and the verifier exchange token ids only, so a draft model whose tokenizer differs from
the target's does not fail loudly: its trees are merely rejected, or worse, accepted where the
ids happen to coincide. Drafters therefore send `TokenizerFingerprint` at OpenSession and the
verifier compares it with its target's (`differences`), refusing a mismatch by name.

The fingerprint holds the vocabulary size, the special tokens with their ids (the bos/eos/pad/unk
roles under their role names, every other special token under its own text), the sha256 of the
whole token -> id map (JSON with sorted keys, so equal across processes and machines), and
`RANGE_COUNT` short digests of the same map cut into equal id ranges, which let the receiver say
where two vocabularies of one size differ without either side sending its vocabulary.

This module owns the fingerprint and its comparison. It is pure Python (json, hashlib) and reads
a tokenizer only through the transformers methods `get_vocab`, `all_special_tokens` and
`added_tokens_decoder` (duck-typed: it imports no transformers); loading a tokenizer is
`tokenizers.py`, and putting the fingerprint on the wire is the serving layer's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping

# The special-token roles, recorded under these names (their token's id).
ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
# Id ranges with a digest each: 32 x 8 bytes travel with every open.
RANGE_COUNT = 32
RANGE_DIGEST_BYTES = 8


@dataclasses.dataclass(frozen=True)
class TokenizerFingerprint:
  """See the module docstring. `special_tokens` is sorted (key, id) pairs, so the value hashes."""

  vocab_size: int
  special_tokens: tuple[tuple[str, int], ...]
  vocab_sha256: str
  range_digests: bytes = b""  # RANGE_COUNT x RANGE_DIGEST_BYTES; empty: not computed

  @property
  def special_token_ids(self) -> dict[str, int]:
    return dict(self.special_tokens)

  def to_fields(self) -> dict[str, Any]:
    """The fields of the wire message `specedge.v1.TokenizerFingerprint`."""
    return dict(vocab_size=self.vocab_size, special_tokens=self.special_token_ids,
                vocab_sha256=self.vocab_sha256, range_digests=self.range_digests)

  @classmethod
  def from_fields(cls, *, vocab_size: int, special_tokens: Mapping[str, int], vocab_sha256: str,
                  range_digests: bytes = b"") -> "TokenizerFingerprint":
    return cls(vocab_size=int(vocab_size),
               special_tokens=tuple(sorted((str(k), int(v)) for k, v in special_tokens.items())),
               vocab_sha256=str(vocab_sha256), range_digests=bytes(range_digests))


def _digest(entries: Any) -> bytes:
  text = json.dumps(entries, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
  return hashlib.sha256(text.encode("ascii")).digest()


def _range_of(token_id: int, vocab_size: int) -> int:
  return min(RANGE_COUNT - 1, max(0, token_id) * RANGE_COUNT // max(1, vocab_size))


def _range_bounds(index: int, vocab_size: int) -> tuple[int, int]:
  """The ids [start, end) of range `index` (the inverse of `_range_of` over [0, vocab_size))."""
  start = -(-index * vocab_size // RANGE_COUNT)
  end = -(-(index + 1) * vocab_size // RANGE_COUNT)
  return start, end


def from_vocab(vocab: Mapping[str, int],
               special_tokens: Mapping[str, int]) -> TokenizerFingerprint:
  """The fingerprint of a token -> id map and its special tokens (role or text -> id)."""
  vocab = {str(token): int(token_id) for token, token_id in vocab.items()}
  size = len(vocab)
  ranges: list[list[tuple[int, str]]] = [[] for _ in range(RANGE_COUNT)]
  for token, token_id in vocab.items():
    ranges[_range_of(token_id, size)].append((token_id, token))
  digests = b"".join(_digest(sorted(entries))[:RANGE_DIGEST_BYTES] for entries in ranges)
  return TokenizerFingerprint.from_fields(vocab_size=size, special_tokens=special_tokens,
                                          vocab_sha256=_digest(vocab).hex(),
                                          range_digests=digests)


def of_tokenizer(tokenizer) -> TokenizerFingerprint:
  """The fingerprint of a transformers tokenizer (`get_vocab()` includes its added tokens)."""
  vocab = tokenizer.get_vocab()
  specials: dict[str, int] = {}
  for role in ROLES:
    token = getattr(tokenizer, role, None)
    if token is not None:
      specials[role] = vocab.get(str(token), -1)
  tokens = {str(t) for t in getattr(tokenizer, "all_special_tokens", ())}
  for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
    if getattr(added, "special", False):
      tokens.add(str(added.content))
  for token in tokens:
    specials[token] = vocab.get(token, -1)
  return from_vocab(vocab, specials)


def _describe_key(key: str) -> str:
  return key if key in ROLES else f"special token {key!r}"


def differences(ours: TokenizerFingerprint, theirs: TokenizerFingerprint, *,
                our_name: str = "target", their_name: str = "drafter") -> list[str]:
  """What differs between two fingerprints, one phrase each (empty: the same tokenizer)."""
  found = []
  if ours.vocab_size != theirs.vocab_size:
    found.append(f"vocab size {theirs.vocab_size} ({their_name}) vs {ours.vocab_size} "
                 f"({our_name})")
  our_specials, their_specials = ours.special_token_ids, theirs.special_token_ids
  for key in sorted(set(our_specials) | set(their_specials)):
    mine, other = our_specials.get(key), their_specials.get(key)
    if mine == other:
      continue
    if mine is None:
      found.append(f"{_describe_key(key)} only on the {their_name} (id {other})")
    elif other is None:
      found.append(f"{_describe_key(key)} only on the {our_name} (id {mine})")
    else:
      found.append(f"{_describe_key(key)} id {other} ({their_name}) vs {mine} ({our_name})")
  if ours.vocab_sha256 != theirs.vocab_sha256:
    found.append("vocabulary hash differs" + _where(ours, theirs))
  return found


def _where(ours: TokenizerFingerprint, theirs: TokenizerFingerprint) -> str:
  """Which id ranges hold the differences, when both sides sent comparable range digests."""
  step = RANGE_DIGEST_BYTES
  if (ours.vocab_size != theirs.vocab_size or len(ours.range_digests) != RANGE_COUNT * step
      or len(theirs.range_digests) != RANGE_COUNT * step):
    return ""
  differing = [i for i in range(RANGE_COUNT)
               if ours.range_digests[i * step:(i + 1) * step]
               != theirs.range_digests[i * step:(i + 1) * step]]
  if not differing:  # equal per range, unequal as a whole: only a collision of short digests
    return ""
  shown = ", ".join("[%d, %d)" % _range_bounds(i, ours.vocab_size) for i in differing[:3])
  more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
  return (f": token -> id entries differ in {len(differing)} of {RANGE_COUNT} id ranges "
          f"(ids {shown}{more})")


def mismatch_message(ours: TokenizerFingerprint, theirs: TokenizerFingerprint, *,
                     our_name: str = "target", their_name: str = "drafter") -> str:
  """One sentence naming every difference; empty when the fingerprints are equal."""
  found = differences(ours, theirs, our_name=our_name, their_name=their_name)
  if not found:
    return ""
  return f"the {their_name}'s tokenizer is not the {our_name}'s: " + "; ".join(found)


def check_model_vocab(model_vocab_size: int, fingerprint: TokenizerFingerprint,
                      what: str) -> None:
  """Raises ValueError when a model's embedding has fewer rows than its tokenizer has ids: some
  token the tokenizer produces would index past the embedding. (More rows is normal: Qwen pads
  its embedding to a multiple of 128.)"""
  if model_vocab_size < fingerprint.vocab_size:
    raise ValueError(f"{what} has vocab_size {model_vocab_size}, fewer rows than its "
                     f"tokenizer's {fingerprint.vocab_size} tokens")
