"""The shape legend: one letter per array axis, for shape comments and einsum strings.

Every shape comment (`# [B, T, V]`) and every einsum string in the project uses these letters,
each with one meaning only:

  B  batch lanes (one request per lane; in a per-lane cache layout, also the slot axis)
  T  new tokens of one forward (a prefill chunk, a tree's nodes, 1 when decoding)
  S  cache rows of one slot (`max_len`); the key axis of an attention mask over the cache
  P  committed prefix rows (tokens already in the cache before the forward)
  A  accepted-path positions (the rows `kv_cache.compact_rows` moves)
  O  output positions picked by `logits_at` (logits computed only there)
  M  cache slots (`num_slots`)
  L  layers
  D  model width (`hidden_size`)
  F  MLP hidden width (`intermediate_size`)
  V  vocabulary
  Q  query heads (`num_heads`)
  K  key/value heads (`num_kv_heads`)
  G  query heads per key/value head (Q = K * G)
  H  head dim
  N  tree nodes (a tree's capacity)
  C  next-token candidates kept per tree node (the draft's top-C)
  E  beams expanded in one draft step (`n_beams`)

Arithmetic on letters is allowed where an axis is built from others: `[B, T, P + T]`,
`[H / 2]`. Size-1 axes are written `1`. Lowercase names (`m, k, n` of a standalone GEMM
benchmark) are local dimensions outside this legend.

This module is documentation with a lookup table; it imports nothing.
"""

from __future__ import annotations

AXES: dict[str, str] = {
    "B": "batch lanes",
    "T": "new tokens of one forward",
    "S": "cache rows of one slot (max_len)",
    "P": "committed prefix rows",
    "A": "accepted-path positions",
    "O": "output positions picked by logits_at",
    "M": "cache slots (num_slots)",
    "L": "layers",
    "D": "model width (hidden_size)",
    "F": "MLP hidden width (intermediate_size)",
    "V": "vocabulary",
    "Q": "query heads (num_heads)",
    "K": "key/value heads (num_kv_heads)",
    "G": "query heads per key/value head (Q = K * G)",
    "H": "head dim",
    "N": "tree nodes (tree capacity)",
    "C": "next-token candidates per tree node",
    "E": "beams expanded in one draft step (n_beams)",
}
