"""Benchmark of the speculative core, in process (the logic behind `launch/bench_core.py`).

Three measurements; `run` prints the first and the other two as tables (see `verify_curve_table`
and `generation_table`), and draws the verify curve (`plot_verify_curve`):

1. The verify curve: wall time of one jitted `verify` call (forward + sampling + acceptance +
   compaction) for B lanes of T tree tokens each, over a prefix of P cached tokens. The ratio
   to T=1 shows how many tree tokens ride along almost for free.
2. Host overhead: a speculative generation run with `DeviceClock`s on, which block on every
   device call; overhead = (step wall time - device time) / step wall time.
3. Speculative vs target-only tokens/s on the same prompts, taken side by side in one run
   (clocks off, so asynchronous dispatch is as in serving), plus the mean accepted length
   (tokens per verification, bonus included) and a check that greedy outputs are identical.

Also the timing-free acceptance figure behind `launch/measure_acceptance.py`: mean accepted
tokens per verification of a pair for a few trees, and how often each depth is reached
(`measure_acceptance`, `run_acceptance`; `bench/gpu.py` replays it).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from typing import Callable, Sequence

import jax
import numpy as np

from specedge_jax import engine as E
from specedge_jax.data import tokenizers
from specedge_jax.models import kv_cache as kv
from specedge_jax.models.transformer import split_model
from specedge_jax.spec import verify as verify_lib

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class VerifyPoint:
  batch_size: int
  tree_tokens: int
  median_ms: float
  ratio_to_t1: float = 0.0


def verify_inputs(rng: np.random.Generator, vocab: int, batch: int, tree_tokens: int,
                  prefix_len: int) -> tuple:
  """The arguments of `verify_lib.verify` after (graphdef, state, cache) for B = `batch` greedy
  lanes in slots 0..B-1, each a tree of `tree_tokens` nodes over `prefix_len` committed rows.

  The tree is bushy, two levels (the root, then distinct children): the cost of a verify does not
  depend on the shape, and siblings must carry distinct tokens."""
  tokens = rng.integers(0, vocab, (batch, tree_tokens)).astype(np.int32)
  parents = np.zeros((batch, tree_tokens), np.int32)
  parents[:, 0] = -1
  tokens[:, 1:] = (np.arange(1, tree_tokens) % vocab)[None]
  return (np.arange(batch, dtype=np.int32), np.full(batch, prefix_len, np.int32), tokens,
          parents, np.full(batch, tree_tokens, np.int32), np.zeros(batch, np.float32),
          np.ones(batch, np.float32), np.zeros(batch, np.int32),
          np.arange(batch, dtype=np.uint32), np.zeros(batch, np.int32))


def verify_curve(target, batch_sizes: Sequence[int], tree_sizes: Sequence[int], *,
                 prefix_len: int = 128, repeats: int = 20, layerwise: bool = False,
                 on_point: Callable[[VerifyPoint], None] | None = None) -> list[VerifyPoint]:
  """Median wall time of a jitted verify call per (B, T). The cache holds B slots of
  `prefix_len + max(tree_sizes) + 1` rows, all attended. `layerwise`: per-layer weight arrays,
  as the serving engines run them (`split_model(layerwise=True)`); default: the stacked scan."""
  graphdef, state = split_model(target, layerwise=layerwise)
  vocab = target.config.vocab_size
  rng = np.random.default_rng(0)
  points = []
  for batch in batch_sizes:
    cache = kv.KVCache.init(target.config, batch, prefix_len + max(tree_sizes) + 1,
                            target.dtype)
    for tree_tokens in tree_sizes:
      args = verify_inputs(rng, vocab, batch, tree_tokens, prefix_len)
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
  greedy = E.GREEDY
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


# ----------------------------------------------------------------------------------------------
# Tables, plot and JSON of `launch/bench_core.py`.

VERIFY_COLUMNS = ("B", "T", "median ms", "x of T=1", "ms per tree token")
GENERATION_COLUMNS = ("B", "proactive", "target-only tok/s", "speculative tok/s", "speedup",
                      "accepted/step", "hit rate", "after a hit: steps, tree, tok/step",
                      "fresh: tree, tok/step", "host overhead", "identical", "compiles")


def verify_curve_row(p: VerifyPoint) -> list[str]:
  return [str(p.batch_size), str(p.tree_tokens), f"{p.median_ms:.2f}", f"{p.ratio_to_t1:.2f}",
          f"{p.median_ms / (p.batch_size * p.tree_tokens):.3f}"]


def verify_curve_table(points: Sequence[VerifyPoint]):
  """A rich table of the verify curve, one row per (B, T)."""
  from rich.table import Table

  table = Table(title="verify step (forward + sampling + acceptance + compaction)")
  for column in VERIFY_COLUMNS:
    table.add_column(column, justify="right")
  for p in points:
    table.add_row(*verify_curve_row(p))
  return table


def generation_row(c: GenerationComparison) -> list[str]:
  return [str(c.batch_size), c.proactive_mode, f"{c.ar_tokens_per_s:.1f}",
          f"{c.spec_tokens_per_s:.1f}", f"{c.speedup:.2f}x", f"{c.mean_accepted:.2f}",
          "-" if c.proactive_hit_rate is None else f"{c.proactive_hit_rate:.0%}",
          "-" if not c.after_hit[0] else
          f"{c.after_hit[0]}, {c.after_hit[1]:.1f}, {c.after_hit[2]:.2f}",
          "-" if not c.fresh[0] else f"{c.fresh[1]:.1f}, {c.fresh[2]:.2f}",
          f"{c.host_overhead:.1%}", "yes" if c.identical_outputs else "NO",
          str(c.compiles_in_timed_runs)]


def generation_table(comparisons: Sequence[GenerationComparison], *, num_prompts: int,
                     max_new_tokens: int, tree: E.TreeParams):
  """A rich table of the generation comparisons, one row per (B, proactive mode)."""
  from rich.table import Table

  table = Table(title=f"greedy generation, {num_prompts} prompts x {max_new_tokens} tokens, "
                f"tree {dataclasses.astuple(tree)}")
  for column in GENERATION_COLUMNS:
    table.add_column(column, justify="right")
  for c in comparisons:
    table.add_row(*generation_row(c))
  return table


def plot_verify_curve(points: Sequence[VerifyPoint], path: str) -> str:
  """Median verify ms against T, one line per B (PNG); returns the path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for batch in sorted({p.batch_size for p in points}):
    series = [p for p in points if p.batch_size == batch]
    ax.plot([p.tree_tokens for p in series], [p.median_ms for p in series], marker="o",
            label=f"B={batch}")
  ax.set_xlabel("tree tokens per request (T)")
  ax.set_ylabel("verify step, median ms")
  ax.set_title("Verify step time vs tree size")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def to_json(points: Sequence[VerifyPoint], comparisons: Sequence[GenerationComparison],
            **curve_fields) -> dict:
  """`curve_fields` (e.g. prefix_len, layerwise) say how the curve was measured; the verify-time
  estimator reads `prefix_len` from here (`verify_time.curve_samples`)."""
  return {**curve_fields, "verify_curve": [dataclasses.asdict(p) for p in points],
          "generation": [dict(dataclasses.asdict(c), speedup=c.speedup,
                              ar_tokens_per_s=c.ar_tokens_per_s,
                              spec_tokens_per_s=c.spec_tokens_per_s)
                         for c in comparisons]}


def write_json(path: str, points: Sequence[VerifyPoint],
               comparisons: Sequence[GenerationComparison], **curve_fields) -> None:
  with open(path, "w") as f:
    json.dump(to_json(points, comparisons, **curve_fields), f, indent=2)


def run(target_dir: str, draft_dir: str, prompts_path: str, *, num_prompts: int,
        max_new_tokens: int, batch_sizes: Sequence[int], tree_sizes: Sequence[int],
        gen_batch_sizes: Sequence[int], proactive_modes: Sequence[str], tree: E.TreeParams,
        prefix_len: int = 128, repeats: int = 20, gen_repeats: int = 2,
        layerwise: bool = False, out_json: str | None = None, plot: str | None = None,
        console=None) -> tuple[list[VerifyPoint], list[GenerationComparison]]:
  """What `launch/bench_core.py` does: loads the pair and the first `num_prompts` prompts, prints
  the verify-curve table, then the generation table over every (batch size, proactive mode),
  and writes the plot and the JSON when asked."""
  from rich.console import Console

  from specedge_jax.checkpoints import orbax_io
  from specedge_jax.data import prompts as prompts_lib

  # Piped output (logs, notes) gets tables wide enough not to cut their columns.
  console = console or Console(width=None if sys.stdout.isatty() else 160)
  target = orbax_io.load_model(target_dir)
  draft = orbax_io.load_model(draft_dir)
  tokenizer = tokenizers.load_tokenizer(target_dir)
  prompt_ids = prompts_lib.encode_all(tokenizer, prompts_lib.load_records(prompts_path))
  prompt_ids = prompt_ids[:num_prompts]

  with console.status("timing verify ..."):
    points = verify_curve(target, batch_sizes, tree_sizes, prefix_len=prefix_len,
                          repeats=repeats, layerwise=layerwise)
  console.print(verify_curve_table(points))

  comparisons = []
  for batch in gen_batch_sizes:
    for mode in proactive_modes:
      with console.status(f"generating: B={batch}, proactive={mode} ..."):
        comparisons.append(compare_generation(
            target, draft, prompt_ids, batch_size=batch, tree=tree,
            proactive=E.ProactiveParams(mode=mode), max_new_tokens=max_new_tokens,
            eos_token_ids=target.config.eos_token_ids, repeats=gen_repeats))
  if comparisons:  # none asked for (--gen_batch_sizes=): the verify curve alone
    console.print(generation_table(comparisons, num_prompts=len(prompt_ids),
                                   max_new_tokens=max_new_tokens, tree=tree))

  if plot:
    plot_verify_curve(points, plot)
    console.print(f"plot: {plot}")
  if out_json:
    write_json(out_json, points, comparisons, prefix_len=prefix_len, layerwise=layerwise)
  return points, comparisons


# ----------------------------------------------------------------------------------------------
# Acceptance (`launch/measure_acceptance.py`): timing-free, it depends on the models and the tree.


@dataclasses.dataclass(frozen=True)
class Acceptance:
  tree_spec: str  # beams:depth:branch:budget, as given
  mean_accepted: float  # tokens per verification, bonus included
  steps: int
  identical: bool  # speculative output equals target-only output
  # emitted_counts[k - 1]: verifications that emitted k tokens (k - 1 tree nodes accepted, plus
  # the bonus). The last verification of a request counts what it emitted within
  # max_new_tokens, as `mean_accepted` does.
  emitted_counts: tuple[int, ...] = ()

  @property
  def by_depth(self) -> tuple[float, ...]:
    """P(a verification emits >= d tokens) for d = 1, 2, ...: acceptance by depth. Its sum is
    `mean_accepted`."""
    total = sum(self.emitted_counts)
    if not total:
      return ()
    tail = np.cumsum(self.emitted_counts[::-1])[::-1]
    return tuple(float(t) / total for t in tail)

  def line(self) -> str:
    return (f"tree {self.tree_spec}: mean accepted tokens/verification "
            f"{self.mean_accepted:.3f} over {self.steps} steps; identical to target-only: "
            f"{self.identical}")


def parse_tree(spec: str) -> E.TreeParams:
  """'32:4:16:32' (beams:depth:branch:budget) -> TreeParams."""
  return E.TreeParams(*(int(x) for x in spec.split(":")))


def measure_acceptance(target, draft, prompts: Sequence[Sequence[int]],
                       tree_specs: Sequence[str], *, max_new_tokens: int,
                       on_result: Callable[[Acceptance], None] | None = None
                       ) -> list[Acceptance]:
  """Greedy target-only generation once, then speculative generation per tree."""
  largest = max(parse_tree(spec).max_budget for spec in tree_specs)
  max_len = max(len(p) for p in prompts) + max_new_tokens + max(40, largest + 8)
  target_engine = E.TargetEngine(target, num_slots=4, max_len=max_len,
                                 max_tree_nodes=max(33, largest + 1), max_batch_size=4,
                                 eos_token_ids=target.config.eos_token_ids)
  reference = E.generate(target_engine, prompts, max_new_tokens=max_new_tokens)
  results = []
  for spec in tree_specs:
    draft_engine = E.DraftEngine(draft, num_slots=4, max_len=max_len, tree=parse_tree(spec))
    out = E.generate(target_engine, prompts, draft=draft_engine, max_new_tokens=max_new_tokens)
    emitted = [n for step in out.steps for n in step.emitted]
    counts = np.bincount(emitted, minlength=2)[1:] if emitted else np.zeros(0, np.int64)
    result = Acceptance(spec, out.mean_accepted, len(out.steps), out.tokens == reference.tokens,
                        emitted_counts=tuple(int(c) for c in counts))
    results.append(result)
    if on_result:
      on_result(result)
  return results


def run_acceptance(target_dir: str, draft_dir: str, *, num_prompts: int, max_new_tokens: int,
                   tree_specs: Sequence[str]) -> list[Acceptance]:
  """What `launch/measure_acceptance.py` does: the embedded prompts, one printed line per tree."""
  from specedge_jax.checkpoints import orbax_io
  from specedge_jax.data import prompts as prompts_lib

  target, draft = orbax_io.load_model(target_dir), orbax_io.load_model(draft_dir)
  tokenizer = tokenizers.load_tokenizer(target_dir)
  ids = prompts_lib.encode_all(tokenizer, prompts_lib.load_records())[:num_prompts]
  return measure_acceptance(target, draft, ids, tree_specs, max_new_tokens=max_new_tokens,
                            on_result=lambda result: print(result.line()))
