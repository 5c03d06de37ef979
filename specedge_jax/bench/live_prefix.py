"""What live-prefix attention buys: a verify's cost at a short context in a long cache.

Before the change every verify attended over all `max_len` rows of each slot, so its KV traffic
grew with the cache, not with the context. Now the engine bounds the attended rows by a
power-of-two bucket of the longest live prefix plus the tree (`kv_cache.attend_buckets`,
`attend_rows`). This benchmark times the same jitted `verify` (the engine's layerwise weights)
at prefix P in caches of several `max_len`, with `attend_len` = max_len (before) and the
engine's bucket (after), side by side in one run. Median of timed repeats after two warm calls.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Sequence

import jax
import numpy as np
from rich.progress import Progress

from specedge_jax.bench import core as core_bench
from specedge_jax.models import kv_cache as kv
from specedge_jax.models.transformer import split_model
from specedge_jax.spec import verify as verify_lib


@dataclasses.dataclass
class Point:
  max_len: int
  batch_size: int
  tree_tokens: int
  prefix_len: int
  attended_rows_before: int
  attended_rows_after: int
  before_ms: float
  after_ms: float

  @property
  def speedup(self) -> float:
    return self.before_ms / self.after_ms


def _time_verify(graphdef, state, cache, args, attend_len, repeats):
  times = []
  for i in range(repeats + 2):
    start = time.perf_counter()
    cache, *out = verify_lib.verify(graphdef, state, cache, *args, attend_len=attend_len)
    jax.block_until_ready(out)
    if i >= 2:
      times.append(time.perf_counter() - start)
  return cache, 1000 * statistics.median(times)


def measure(target, *, max_lens: Sequence[int], batch_sizes: Sequence[int], tree_tokens: int,
            prefix_len: int, min_rows: int, repeats: int) -> list[Point]:
  graphdef, state = split_model(target, layerwise=True)
  rng = np.random.default_rng(0)
  points = []
  with Progress(transient=True) as progress:
    task = progress.add_task("verify points", total=len(max_lens) * len(batch_sizes))
    for max_len in max_lens:
      buckets = kv.attend_buckets(max_len, min_rows)
      after_rows = kv.attend_rows(prefix_len + tree_tokens, buckets)
      for batch in batch_sizes:
        cache = kv.KVCache.init(target.config, batch, max_len, target.dtype)
        args = core_bench.verify_inputs(rng, target.config.vocab_size, batch, tree_tokens,
                                        prefix_len)
        # Alternate before/after twice, keep each one's best median: less drift between them.
        before, after = [], []
        for _ in range(2):
          cache, ms = _time_verify(graphdef, state, cache, args, None, repeats)
          before.append(ms)
          cache, ms = _time_verify(graphdef, state, cache, args, after_rows, repeats)
          after.append(ms)
        points.append(Point(max_len, batch, tree_tokens, prefix_len, max_len, after_rows,
                            min(before), min(after)))
        progress.advance(task)
  return points


def table(points: Sequence[Point]) -> str:
  lines = ["| max_len | B | T | prefix | rows before | rows after | before ms | after ms | "
           "before / after |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for p in points:
    lines.append(f"| {p.max_len} | {p.batch_size} | {p.tree_tokens} | {p.prefix_len} | "
                 f"{p.attended_rows_before} | {p.attended_rows_after} | {p.before_ms:.2f} | "
                 f"{p.after_ms:.2f} | {p.speedup:.2f}x |")
  return "\n".join(lines)


def plot(points: Sequence[Point], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  labels = [f"max_len {p.max_len}\nB={p.batch_size}" for p in points]
  x = np.arange(len(points))
  fig, ax = plt.subplots(figsize=(1.4 * len(points) + 2, 3.6))
  ax.bar(x - 0.2, [p.before_ms for p in points], 0.4, label="all max_len rows (before)")
  ax.bar(x + 0.2, [p.after_ms for p in points], 0.4, label="live-prefix bucket (after)")
  ax.set_xticks(x, labels, fontsize=8)
  ax.set_ylabel("verify ms (median)")
  ax.set_title(f"verify at prefix {points[0].prefix_len}, T={points[0].tree_tokens}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_json(points: Sequence[Point], path: str, **meta) -> None:
  with open(path, "w") as f:
    json.dump({"meta": meta, "points": [dict(dataclasses.asdict(p), speedup=p.speedup)
                                        for p in points]}, f, indent=1)
