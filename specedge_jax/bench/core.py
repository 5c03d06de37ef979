"""Benchmark of the speculative core, in process (the logic behind `launch/bench_core.py`).

Three measurements, each printed as a table by the launcher:

1. The verify curve: wall time of one jitted `verify` call (forward + sampling + acceptance +
   compaction) for B lanes of T tree tokens each, over a prefix of P cached tokens. The ratio
   to T=1 shows how many tree tokens ride along almost for free.
2. Host overhead: a speculative generation run with `DeviceClock`s on, which block on every
   device call; overhead = (step wall time - device time) / step wall time.
3. Speculative vs target-only tokens/s on the same prompts, taken side by side in one run
   (clocks off, so asynchronous dispatch is as in serving), plus the mean accepted length
   (tokens per verification, bonus included) and a check that greedy outputs are identical.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Sequence

import jax
import numpy as np

from specedge_jax import engine as E
from specedge_jax.models import kv_cache as kv
from specedge_jax.models.transformer import split_model
from specedge_jax.spec import sampling as sampling_lib
from specedge_jax.spec import verify as verify_lib

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class VerifyPoint:
  batch_size: int
  tree_tokens: int
  median_ms: float
  ratio_to_t1: float = 0.0


def verify_curve(target, batch_sizes: Sequence[int], tree_sizes: Sequence[int], *,
                 prefix_len: int = 128, repeats: int = 20,
                 on_point: Callable[[VerifyPoint], None] | None = None) -> list[VerifyPoint]:
  """Median wall time of a jitted verify call per (B, T)."""
  graphdef, state = split_model(target)
  vocab = target.config.vocab_size
  rng = np.random.default_rng(0)
  points = []
  for batch in batch_sizes:
    cache = kv.KVCache.init(target.config, batch, prefix_len + max(tree_sizes) + 1,
                            target.dtype)
    for tree_tokens in tree_sizes:
      tokens = rng.integers(0, vocab, (batch, tree_tokens)).astype(np.int32)
      # A bushy two-level tree (root, then children): the cost does not depend on the shape.
      parents = np.zeros((batch, tree_tokens), np.int32)
      parents[:, 0] = -1
      tokens[:, 1:] = (np.arange(1, tree_tokens) % vocab)[None]
      args = (np.arange(batch, dtype=np.int32), np.full(batch, prefix_len, np.int32), tokens,
              parents, np.full(batch, tree_tokens, np.int32), np.zeros(batch, np.float32),
              np.ones(batch, np.float32), np.zeros(batch, np.int32),
              np.arange(batch, dtype=np.uint32), np.zeros(batch, np.int32))
      times = []
      for i in range(repeats + 2):  # the first call compiles, the second warms caches
        start = time.perf_counter()
        cache, *outs = verify_lib.verify(graphdef, state, cache, *args)
        jax.block_until_ready(outs)
        if i >= 2:
          times.append(time.perf_counter() - start)
      point = VerifyPoint(batch, tree_tokens, 1e3 * statistics.median(times))
      points.append(point)
  for point in points:
    base = next(p for p in points if p.batch_size == point.batch_size)
    point.ratio_to_t1 = point.median_ms / base.median_ms
    if on_point:
      on_point(point)
  return points


@dataclasses.dataclass
class GenerationComparison:
  batch_size: int
  tree: E.TreeParams
  proactive_mode: str
  num_prompts: int
  ar_tokens: int
  ar_wall_s: float
  spec_tokens: int
  spec_wall_s: float
  mean_accepted: float
  proactive_hit_rate: float | None
  host_overhead: float  # share of a speculative step's wall time spent outside device calls
  # (steps, mean tree size, mean tokens per step) of trees that followed a proactive hit, and of
  # freshly grown ones (`GenerationOutput.split_by_proactive_hit`).
  after_hit: tuple[int, float | None, float | None]
  fresh: tuple[int, float | None, float | None]
  identical_outputs: bool
  compiles_in_timed_runs: int  # must be 0: a timed run that compiles measures the compiler

  @property
  def ar_tokens_per_s(self) -> float:
    return self.ar_tokens / self.ar_wall_s

  @property
  def spec_tokens_per_s(self) -> float:
    return self.spec_tokens / self.spec_wall_s

  @property
  def speedup(self) -> float:
    return self.spec_tokens_per_s / self.ar_tokens_per_s


def compare_generation(target, draft, prompts: Sequence[Sequence[int]], *, batch_size: int,
                       tree: E.TreeParams, proactive: E.ProactiveParams, max_new_tokens: int,
                       eos_token_ids: Sequence[int] = (), repeats: int = 2
                       ) -> GenerationComparison:
  """Target-only vs speculative greedy generation on the same prompts, in one process.

  `repeats` timed passes alternate the two methods; each keeps its best wall time (interference
  only adds time, and a single disturbed pass can move a figure a lot on a shared CPU), and
  every pass's outputs must be identical.
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  max_prompt = max(len(p) for p in prompts)
  max_len = max_prompt + max_new_tokens + tree.max_budget + 8
  target_engine = E.TargetEngine(target, num_slots=batch_size, max_len=max_len,
                                 max_tree_nodes=tree.max_budget + 1, max_batch_size=batch_size,
                                 eos_token_ids=eos_token_ids)
  draft_engine = E.DraftEngine(draft, num_slots=batch_size, max_len=max_len, tree=tree,
                               proactive=proactive)
  greedy = sampling_lib.GREEDY
  # Warm-up: the real workload on up to 8 prompts at full length, so every path that compiles
  # something (batch buckets, prefill chunks, an unexpanded accepted leaf, proactive re-rooting)
  # has run once. A short warm-up missed some, and their compiling then landed in the timed run.
  target_engine.warmup()
  warm = list(prompts[:max(8, batch_size)]) + [list(prompts[0][:3])]
  E.generate(target_engine, warm, sampling=greedy, max_new_tokens=max_new_tokens)
  E.generate(target_engine, warm, draft=draft_engine, sampling=greedy,
             max_new_tokens=max_new_tokens)
  compiles = []
  listener = lambda name, *_a, **_k: compiles.append(name) if name == _COMPILE_EVENT else None
  jax.monitoring.register_event_duration_secs_listener(listener)

  ar_runs, spec_runs = [], []
  for _ in range(repeats):
    ar_runs.append(E.generate(target_engine, prompts, sampling=greedy,
                              max_new_tokens=max_new_tokens))
    spec_runs.append(E.generate(target_engine, prompts, draft=draft_engine, sampling=greedy,
                                max_new_tokens=max_new_tokens))
  ar = min(ar_runs, key=lambda run: run.wall_s)
  spec = min(spec_runs, key=lambda run: run.wall_s)
  # Host overhead: the same speculative run with every device call blocked on and timed.
  target_engine.clock.enabled = draft_engine.clock.enabled = True
  target_engine.clock.seconds = draft_engine.clock.seconds = 0.0
  clocked = E.generate(target_engine, prompts, draft=draft_engine, sampling=greedy,
                       max_new_tokens=max_new_tokens)
  device_s = target_engine.clock.seconds + draft_engine.clock.seconds
  target_engine.clock.enabled = draft_engine.clock.enabled = False
  jax.monitoring.unregister_event_duration_listener(listener)
  hits = [h for s in spec.steps for h in s.proactive_hits if h is not None]
  split = spec.split_by_proactive_hit()
  return GenerationComparison(
      batch_size=batch_size, tree=tree, proactive_mode=proactive.mode,
      num_prompts=len(prompts), ar_tokens=ar.num_tokens, ar_wall_s=ar.wall_s,
      spec_tokens=spec.num_tokens, spec_wall_s=spec.wall_s, mean_accepted=spec.mean_accepted,
      proactive_hit_rate=(sum(hits) / len(hits)) if hits else None,
      host_overhead=max(0.0, 1.0 - device_s / clocked.wall_s),
      after_hit=split["after_hit"], fresh=split["fresh"],
      identical_outputs=all(run.tokens == ar.tokens for run in (*ar_runs, *spec_runs, clocked)),
      compiles_in_timed_runs=len(compiles))
