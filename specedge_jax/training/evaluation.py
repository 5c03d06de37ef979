"""Quality figures of a target/draft pair: held-out loss and perplexity, and draft-target agreement.

Agreement is what speculative decoding lives on. Two views are measured on held-out prompts:

* teacher-forced: over the prompt's own tokens, how often the draft's argmax next token equals
  the target's;
* greedy: the target continues each prompt greedily for `num_new_tokens`; at each of those
  positions, how often the draft's argmax (given the same prefix) equals the target's token.
  This is the chance that one drafted greedy token is accepted.

This module owns these measurements. It never trains (see `recipe.py`) and never runs the
speculative engine.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specedge_jax.data import datasets
from specedge_jax.data.tokenizers import load_tokenizer
from specedge_jax.models import kv_cache as kv
from specedge_jax.models.transformer import Transformer, causal_mask
from specedge_jax.training import bpe_tokenizer, corpus, trainer

EVAL_DATASETS = {name: datasets.DATASET_FILES[name] for name in ("c4", "mtbench")}


def load_eval_prompts(dataset_dir: str, name: str) -> list[str]:
  """Prompt texts of a held-out set. mtbench's `[INST]q[/INST]` becomes our chat template."""
  if name not in EVAL_DATASETS:
    raise ValueError(f"unknown evaluation set {name!r}; expected one of {tuple(EVAL_DATASETS)}")
  texts = datasets.read_index_text_rows(os.path.join(dataset_dir, EVAL_DATASETS[name]))
  if name == "mtbench":
    out = []
    for text in texts:
      # The rows end with an "ASSISTANT:" cue that our template replaces with its own header.
      text = text.rsplit("ASSISTANT:", 1)[0] if text.rstrip().endswith("ASSISTANT:") else text
      out.append(bpe_tokenizer.format_chat(corpus.llama2_chat_to_messages(text),
                                      add_generation_prompt=True))
    return out
  return texts


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill(graphdef, state, cache, tokens, lengths):
  """Writes the left-aligned prompts [B, P] into slots 0..B-1; returns (cache, first token [B])."""
  model = nnx.merge(graphdef, state)
  batch, prompt_len = tokens.shape
  steps = jnp.arange(prompt_len, dtype=jnp.int32)
  positions = jnp.broadcast_to(steps, (batch, prompt_len))
  write_rows = jnp.where(steps[None, :] < lengths[:, None], positions, kv.DROP_ROW)
  rows = jnp.arange(cache.max_len)
  mask = (rows[None, None, :] <= steps[None, :, None]) & (rows[None, None, :] < lengths[:, None,
                                                                                          None])
  logits, cache = model(tokens, positions, mask, cache, jnp.arange(batch, dtype=jnp.int32),
                        write_rows, logits_at=(lengths - 1)[:, None])
  return cache, logits[:, 0].argmax(-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _decode(graphdef, state, cache, tokens, positions):
  """One greedy step for every lane: token [B] at row `positions` [B]; returns the next token."""
  model = nnx.merge(graphdef, state)
  batch = tokens.shape[0]
  mask = jnp.arange(cache.max_len)[None, None, :] <= positions[:, None, None]
  logits, cache = model(tokens[:, None], positions[:, None], mask, cache,
                        jnp.arange(batch, dtype=jnp.int32), positions[:, None])
  return cache, logits[:, 0].argmax(-1).astype(jnp.int32)


def greedy_continuations(model: Transformer, prompts: Sequence[Sequence[int]],
                         num_new_tokens: int, batch_size: int = 16) -> np.ndarray:
  """The model's greedy continuation [len(prompts), num_new_tokens] of each prompt (KV-cached)."""
  graphdef, state = nnx.split(model)
  prompt_len = max(len(p) for p in prompts)
  out = np.zeros((len(prompts), num_new_tokens), np.int32)
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    real = len(chunk)
    chunk += [chunk[0]] * (batch_size - real)  # pad lanes: repeats, results dropped
    tokens = np.zeros((batch_size, prompt_len), np.int32)
    lengths = np.array([len(p) for p in chunk], np.int32)
    for b, p in enumerate(chunk):
      tokens[b, :len(p)] = p
    cache = kv.KVCache.init(model.config, batch_size, prompt_len + num_new_tokens)
    cache, token = _prefill(graphdef, state, cache, jnp.asarray(tokens), jnp.asarray(lengths))
    generated = [token]
    for step in range(num_new_tokens - 1):
      cache, token = _decode(graphdef, state, cache, token, jnp.asarray(lengths + step))
      generated.append(token)
    out[start:start + real] = np.stack([np.asarray(t) for t in generated], axis=1)[:real]
  return out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _argmax_next(graphdef, state, tokens, lengths):
  model = nnx.merge(graphdef, state)
  batch, seq = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  logits, _ = model(tokens, positions, causal_mask(lengths, seq))
  return logits.argmax(-1).astype(jnp.int32)


def argmax_next_tokens(model: Transformer, sequences: Sequence[Sequence[int]],
                       batch_size: int = 16) -> list[np.ndarray]:
  """For each sequence, the model's argmax next token at every position (cache-less forward)."""
  graphdef, state = nnx.split(model)
  seq_len = max(len(s) for s in sequences)
  out = []
  for start in range(0, len(sequences), batch_size):
    chunk = list(sequences[start:start + batch_size])
    real = len(chunk)
    chunk += [chunk[0]] * (batch_size - real)
    tokens = np.zeros((batch_size, seq_len), np.int32)
    for b, s in enumerate(chunk):
      tokens[b, :len(s)] = s
    lengths = jnp.asarray([len(s) for s in chunk], jnp.int32)
    predicted = np.asarray(_argmax_next(graphdef, state, jnp.asarray(tokens), lengths))
    out += [predicted[b, :len(chunk[b])] for b in range(real)]
  return out


@dataclasses.dataclass(frozen=True)
class Agreement:
  prompts: int
  teacher_forced: float  # over prompt tokens
  teacher_forced_positions: int
  greedy: float  # over the target's greedy continuation
  greedy_positions: int


def draft_target_agreement(target: Transformer, draft: Transformer, tokenizer,
                           prompts: Sequence[str], num_new_tokens: int = 64,
                           max_prompt_tokens: int = 320) -> Agreement:
  """Top-1 agreement of draft vs target on `prompts` (see the module docstring).

  Prompts longer than `max_prompt_tokens` keep their last tokens, so the whole sequence stays
  near the models' training context.
  """
  encoded = [tokenizer(p, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
             for p in prompts]
  continuations = greedy_continuations(target, encoded, num_new_tokens)
  sequences = [list(p) + list(c) for p, c in zip(encoded, continuations)]
  target_next = argmax_next_tokens(target, sequences)
  draft_next = argmax_next_tokens(draft, sequences)
  forced_hits = forced_total = greedy_hits = greedy_total = 0
  for prompt, t_next, d_next in zip(encoded, target_next, draft_next):
    n = len(prompt)
    # Positions 0..n-2 predict prompt tokens; n-1 .. n+N-2 predict the continuation. The last
    # position predicts past the continuation and is not scored.
    forced_hits += int((t_next[:n - 1] == d_next[:n - 1]).sum())
    forced_total += n - 1
    greedy_hits += int((t_next[n - 1:-1] == d_next[n - 1:-1]).sum())
    greedy_total += len(t_next) - n
  return Agreement(prompts=len(prompts), teacher_forced=forced_hits / max(forced_total, 1),
                   teacher_forced_positions=forced_total,
                   greedy=greedy_hits / max(greedy_total, 1), greedy_positions=greedy_total)


def held_out_losses(model: Transformer, tokenizer, dataset_dir: str, seq_len: int,
                    validation_fraction: float = 0.05, seed: int = 0,
                    use_pydoc: bool = True) -> dict[str, float]:
  """Mean next-token loss (nats) on the training sources' validation split and on c4 text.

  The split must match the training run's (same fraction and seed) to be held out.
  """
  docs = corpus.load_training_documents(dataset_dir, use_pydoc)
  _, validation = corpus.split_documents(docs, validation_fraction, seed)
  c4 = [corpus.Document("c4", t) for t in load_eval_prompts(dataset_dir, "c4")]
  return {
      "validation": trainer.evaluate_loss(
          model, corpus.encode_documents(tokenizer, validation), seq_len),
      "c4": trainer.evaluate_loss(model, corpus.encode_documents(tokenizer, c4), seq_len),
  }


def evaluate_pair(target_dir: str, draft_dir: str, dataset_dir: str, *, seq_len: int = 384,
                  num_new_tokens: int = 64, echo=print) -> dict:
  """All figures for the HF folders of a target and a draft sharing one tokenizer."""
  from specedge_jax.checkpoints import hf

  tokenizer = load_tokenizer(target_dir)
  target = hf.load_hf_model(target_dir)
  draft = hf.load_hf_model(draft_dir)
  report: dict = {"loss": {}, "perplexity": {}, "agreement": {}}
  for name, model in (("target", target), ("draft", draft)):
    losses = held_out_losses(model, tokenizer, dataset_dir, seq_len)
    report["loss"][name] = losses
    report["perplexity"][name] = {k: float(np.exp(v)) for k, v in losses.items()}
    echo(f"{name}: loss {losses} perplexity {report['perplexity'][name]}")
  for name in EVAL_DATASETS:
    agreement = draft_target_agreement(target, draft, tokenizer,
                                       load_eval_prompts(dataset_dir, name), num_new_tokens)
    report["agreement"][name] = dataclasses.asdict(agreement)
    echo(f"agreement on {name}: {agreement}")
  return report


def write_report(report: dict, path: str) -> None:
  with open(path, "w") as f:
    json.dump(report, f, indent=2)
