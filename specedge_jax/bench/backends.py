"""XLA vs PyTorch: the tree-verification forward and the decode step of one checkpoint, timed
side by side, with a logit-agreement check in the same run.

What each side computes (identical work, so the times compare):

  Setup, untimed: B lanes, each with a P-token prefix already in the KV cache (a prefill pass),
  and a random tree of T tokens per lane (node 0 is the root; every other node's parent is an
  earlier node). Tree node i sits at RoPE position P + depth(i) and may attend to the whole
  prefix and to its own ancestors (itself included): the tree attention mask.

  verify (timed), one forward of the B x T tree tokens that returns float32 logits [B, T, V]
  for every node and writes the T new key/value rows of every layer into the cache:
    - jax: our `Transformer` under `jax.jit` (module split outside, merged inside), the cache a
      donated argument of the stacked layout `[L, B, P + T, K, H]`; mask `[B, T, P + T]` bool.
      Attention spans the whole cache (P + T rows) under the mask.
    - torch-eager-dynamic: HF transformers' `*ForCausalLM` (SDPA attention, the default) with
      its default `DynamicCache` holding the prefix; the tree goes in with `position_ids` and a
      4D additive mask `[B, 1, T, P + T]` (0 = visible, float32 min = hidden), which HF passes
      to attention unchanged. The cache concatenates the T rows; `crop` removes them after the
      call (untimed, a slicing view).
    - torch-eager-static: the same with HF's `StaticCache(max_cache_len=P + T)`: fixed-shape
      buffers written in place with `index_copy_` (the layout torch.compile needs, and the
      closest to ours); its write pointer is reset to P after the call (untimed).
    - torch-compile: `torch.compile(model.forward, dynamic=False)` on the static-cache path,
      one compilation per shape (Inductor's C++ CPU backend). A failure is caught and reported.

  decode (timed): the autoregressive step, one token per lane at position P with a causal view
  of the prefix. jax runs the same jitted forward with T = 1. The torch variants call the model
  the ordinary way (no custom mask; HF builds its causal mask), which is its fast path.

Timing: after warm-up calls (which absorb jit and torch.compile compilation; those times are
reported separately), the variants are called round-robin, `repeats` times each, so that load
from other processes hits all of them alike. The median of each is reported, and the minimum:
on a shared machine interference only ever adds time, so the best call is the closest to the
uninterfered cost. Every call ends
with its outputs materialized (`block_until_ready` for jax; torch CPU calls are synchronous).

Shapes: see specedge_jax/shapes.py (here the cache has one slot per lane, so its slot axis is B).

`run` (the model cases) and `run_gemms` (--gemm_shapes) are `launch/bench_backends.py`'s runs:
progress lines, tables, plot and JSON.

This module owns the benchmark. It never changes the model or the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specedge_jax.checkpoints import hf
from specedge_jax.models import kv_cache as kv
from specedge_jax.models import transformer as model_lib
from specedge_jax.testing.checkpoints import save_hf_model

DEFAULT_VARIANTS = ("jax", "torch-eager-dynamic", "torch-eager-static", "torch-compile")
VARIANTS = (*DEFAULT_VARIANTS, "jax-unstacked")  # the last: a diagnostic of our layer scan
LOGIT_ATOL = 1e-4


@dataclasses.dataclass(frozen=True)
class TinyQwen3Shape:
  """The random default checkpoint: the embedded target's shape (about 4.2M parameters)."""

  vocab_size: int = 4096
  hidden_size: int = 256
  intermediate_size: int = 768
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 64
  tie_word_embeddings: bool = True


def save_random_qwen3(folder: str, shape: TinyQwen3Shape = TinyQwen3Shape(), seed: int = 0,
                      max_position_embeddings: int = 4096) -> str:
  """Saves a random-init HF Qwen3 of `shape` with transformers (norms perturbed, so they matter
  for the logit check); returns the folder."""
  save_hf_model(folder, "qwen3", seed=seed, vocab_size=shape.vocab_size,
                hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                num_layers=shape.num_layers, num_heads=shape.num_heads,
                num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                tie=shape.tie_word_embeddings, max_position_embeddings=max_position_embeddings)
  return folder


# ----------------------------------------------------------------------------------------------
# Inputs.


@dataclasses.dataclass(frozen=True)
class Case:
  kind: str  # 'verify' or 'decode'
  batch: int
  tree_size: int  # T; 1 for decode

  @property
  def label(self) -> str:
    return f"{self.kind} B={self.batch} T={self.tree_size}"


@dataclasses.dataclass(frozen=True)
class CaseInputs:
  """One case's inputs as numpy arrays."""

  prefix: np.ndarray  # [B, P] int32
  tokens: np.ndarray  # [B, T] int32
  depth: np.ndarray  # [B, T] int32
  ancestors: np.ndarray  # [B, T, T] bool, ancestors[b, i, j]: node j is i or an ancestor of i

  @property
  def prefix_len(self) -> int:
    return self.prefix.shape[1]

  @property
  def tree_size(self) -> int:
    return self.tokens.shape[1]

  def visible(self) -> np.ndarray:
    """[B, T, P + T] bool: the prefix and the node's ancestors."""
    batch = self.tokens.shape[0]
    prefix = np.ones((batch, self.tree_size, self.prefix_len), bool)
    return np.concatenate([prefix, self.ancestors], axis=2)


def random_tree(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
  """(depth [T], ancestors [T, T]) of a random tree of T = `size` nodes; node 0 is the root."""
  depth = np.zeros(size, np.int32)
  ancestors = np.eye(size, dtype=bool)
  for node in range(1, size):
    parent = rng.integers(0, node)
    depth[node] = depth[parent] + 1
    ancestors[node] |= ancestors[parent]
  return depth, ancestors


def make_inputs(case: Case, prefix_len: int, vocab_size: int, seed: int) -> CaseInputs:
  rng = np.random.default_rng(seed)
  trees = [random_tree(rng, case.tree_size) for _ in range(case.batch)]
  return CaseInputs(
      prefix=rng.integers(0, vocab_size, (case.batch, prefix_len)).astype(np.int32),
      tokens=rng.integers(0, vocab_size, (case.batch, case.tree_size)).astype(np.int32),
      depth=np.stack([d for d, _ in trees]),
      ancestors=np.stack([a for _, a in trees]))


# ----------------------------------------------------------------------------------------------
# Runners: prepare(inputs) sets up the prefix cache (untimed); call() runs the timed forward and
# returns its logits as numpy only when asked (the conversion is outside the timing).


class JaxRunner:
  """Our Flax model under `jax.jit`, with a donated stacked cache.

  `unstacked=True` ('jax-unstacked', a diagnostic): the layers' weights as separate arrays,
  looped in Python inside jit (`layer_states`), instead of the stacked weights in a `lax.scan`
  that the engines use; its "x" column is its time over the stacked one's.
  """

  def __init__(self, hf_dir: str, unstacked: bool = False):
    model = hf.load_hf_model(hf_dir)
    self.config = model.config
    self.name = "jax-unstacked" if unstacked else "jax"
    # Split outside jit, merge inside: the parameters are a traced argument, not constants
    # baked into the program (smaller HLO, faster compiles, one program for any weights).
    self._graphdef, self._state = nnx.split(model)
    self._layer_states = model_lib.unstack_layers(model) if unstacked else None

    def forward(state, layer_states, tokens, positions, mask, cache, slots, write_rows):
      module = nnx.merge(self._graphdef, state)
      return module(tokens, positions, mask, cache, slots, write_rows,
                    layer_states=layer_states)

    self._forward = jax.jit(forward, donate_argnames=("cache",))
    self.compile_s: float | None = None

  def prepare(self, case: Case, inputs: CaseInputs) -> None:
    batch, prefix_len, tree_size = case.batch, inputs.prefix_len, inputs.tree_size
    cache_len = prefix_len + tree_size
    cache = kv.KVCache.init(self.config, num_slots=batch, max_len=cache_len)
    slots = jnp.arange(batch, dtype=jnp.int32)
    rows = jnp.broadcast_to(jnp.arange(prefix_len, dtype=jnp.int32), (batch, prefix_len))
    prefill_mask = jnp.broadcast_to(
        jnp.arange(cache_len)[None, None, :] <= jnp.arange(prefix_len)[None, :, None],
        (batch, prefix_len, cache_len))
    _, self._cache = self._forward(self._state, self._layer_states, jnp.asarray(inputs.prefix),
                                   rows, prefill_mask, cache, slots, rows)
    self._args = (jnp.asarray(inputs.tokens), jnp.asarray(prefix_len + inputs.depth),
                  jnp.asarray(inputs.visible()))
    self._slots = slots
    self._write_rows = jnp.broadcast_to(
        prefix_len + jnp.arange(tree_size, dtype=jnp.int32), (batch, tree_size))
    start = time.perf_counter()
    jax.block_until_ready(self.call())
    self.compile_s = time.perf_counter() - start

  def call(self):
    tokens, positions, mask = self._args
    logits, self._cache = self._forward(self._state, self._layer_states, tokens, positions, mask,
                                        self._cache, self._slots, self._write_rows)
    return logits.block_until_ready()


class TorchRunner:
  """HF transformers' PyTorch model: eager with a dynamic or static cache, or compiled."""

  def __init__(self, hf_dir: str, variant: str, num_threads: int | None = None):
    import torch
    import transformers

    if num_threads:
      torch.set_num_threads(num_threads)
    self.torch = torch
    self.name = variant
    self.static = variant in ("torch-eager-static", "torch-compile")
    self.model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32).eval()
    self._forward = self.model.forward
    if variant == "torch-compile":
      # One graph per shape, as in our jit; the recompile limit must admit every case.
      torch._dynamo.config.cache_size_limit = 64
      self._forward = torch.compile(self.model.forward, dynamic=False)
    self.compile_s: float | None = None

  def prepare(self, case: Case, inputs: CaseInputs) -> None:
    torch = self.torch
    from transformers import DynamicCache, StaticCache

    prefix_len, tree_size = inputs.prefix_len, inputs.tree_size
    config = self.model.config
    self._cache = (StaticCache(config=config, max_cache_len=prefix_len + tree_size)
                   if self.static else DynamicCache(config=config))
    with torch.inference_mode():
      self.model(torch.from_numpy(inputs.prefix.astype(np.int64)),
                 past_key_values=self._cache, use_cache=True)
    self._prefix_len, self._tree_size = prefix_len, tree_size
    self._kwargs = dict(input_ids=torch.from_numpy(inputs.tokens.astype(np.int64)),
                        past_key_values=self._cache, use_cache=True)
    if case.kind == "verify":
      additive = np.where(inputs.visible(), 0.0, np.finfo(np.float32).min).astype(np.float32)
      self._kwargs.update(
          attention_mask=torch.from_numpy(additive[:, None]),
          position_ids=torch.from_numpy((prefix_len + inputs.depth).astype(np.int64)))
    start = time.perf_counter()
    self.call()
    self.compile_s = time.perf_counter() - start

  def _rewind(self) -> None:
    if self.static:
      for layer in self._cache.layers:
        layer.cumulative_length.fill_(self._prefix_len)
    else:
      self._cache.crop(-self._tree_size)  # negative: the number of trailing rows to drop

  def call(self):
    with self.torch.inference_mode():
      logits = self._forward(**self._kwargs).logits
    # Untimed in spirit but inside the call: a write-pointer reset or a slicing view (~us).
    self._rewind()
    return logits


def _to_numpy(logits) -> np.ndarray:
  if hasattr(logits, "detach"):
    return logits.detach().numpy()
  return np.asarray(logits)


# ----------------------------------------------------------------------------------------------
# The benchmark.


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  batch_sizes: tuple[int, ...] = (1, 4, 8)
  tree_sizes: tuple[int, ...] = (1, 16, 32, 64)
  decode: bool = True
  prefix_len: int = 128
  repeats: int = 20
  warmup: int = 2
  variants: tuple[str, ...] = DEFAULT_VARIANTS
  torch_threads: int | None = None
  seed: int = 0

  def cases(self) -> list[Case]:
    cases = [Case("verify", b, t) for b in self.batch_sizes for t in self.tree_sizes]
    if self.decode:
      cases += [Case("decode", b, 1) for b in self.batch_sizes]
    return cases


@dataclasses.dataclass(frozen=True)
class VariantResult:
  median_ms: float | None
  p25_ms: float | None
  p75_ms: float | None
  min_ms: float | None  # best of the repeats: the cost with the least interference
  compile_s: float | None  # the first call of the case: jit / torch.compile compilation
  max_abs_logit_diff: float | None  # against jax; None for jax itself
  error: str | None = None


@dataclasses.dataclass(frozen=True)
class CaseResult:
  case: Case
  results: dict[str, VariantResult]

  def ratio(self, variant: str, statistic: str = "median") -> float | None:
    """How many times faster jax is than `variant` (its time / jax's, median or min)."""
    mine, theirs = self.results.get("jax"), self.results.get(variant)
    if not mine or not theirs or mine.error or theirs.error:
      return None
    return getattr(theirs, f"{statistic}_ms") / getattr(mine, f"{statistic}_ms")


def _describe(error: BaseException) -> str:
  text = f"{type(error).__name__}: {error}".strip()
  return text.splitlines()[0][:200]


def run_case(case: Case, runners: Sequence, config: BenchConfig, vocab_size: int) -> CaseResult:
  inputs = make_inputs(case, config.prefix_len, vocab_size, config.seed)
  live, errors, compile_s, logits = [], {}, {}, {}
  for runner in runners:
    try:
      runner.prepare(case, inputs)
      compile_s[runner.name] = runner.compile_s
      for _ in range(config.warmup):
        runner.call()
      logits[runner.name] = _to_numpy(runner.call())
      live.append(runner)
    except Exception as e:  # noqa: BLE001 - a failing backend is reported, not fatal
      errors[runner.name] = _describe(e)
  times: dict[str, list[float]] = {r.name: [] for r in live}
  for _ in range(config.repeats):
    for runner in live:  # round-robin: background load lands on every variant alike
      start = time.perf_counter()
      runner.call()
      times[runner.name].append((time.perf_counter() - start) * 1e3)
  reference = logits.get("jax")
  results = {}
  for runner in runners:
    name = runner.name
    if name in errors:
      results[name] = VariantResult(None, None, None, None, None, None, errors[name])
      continue
    samples = np.asarray(times[name])
    diff = (None if name == "jax" or reference is None
            else float(np.abs(logits[name] - reference).max()))
    results[name] = VariantResult(
        median_ms=float(np.median(samples)), p25_ms=float(np.percentile(samples, 25)),
        p75_ms=float(np.percentile(samples, 75)), min_ms=float(samples.min()),
        compile_s=compile_s[name],
        max_abs_logit_diff=diff)
  return CaseResult(case, results)


def make_runners(hf_dir: str, variants: Sequence[str], torch_threads: int | None = None) -> list:
  unknown = set(variants) - set(VARIANTS)
  if unknown:
    raise ValueError(f"unknown variants {sorted(unknown)}; expected some of {VARIANTS}")
  runners = []
  for variant in variants:
    if variant.startswith("jax"):
      runners.append(JaxRunner(hf_dir, unstacked=variant == "jax-unstacked"))
    else:
      runners.append(TorchRunner(hf_dir, variant, torch_threads))
  return runners


def run_benchmark(hf_dir: str | None, config: BenchConfig,
                  on_case: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
  """Runs every case; `hf_dir` None saves a random `TinyQwen3Shape` checkpoint first."""
  with tempfile.TemporaryDirectory() as scratch:
    if hf_dir is None:
      hf_dir = save_random_qwen3(os.path.join(scratch, "tiny_qwen3"), seed=config.seed)
    runners = make_runners(hf_dir, config.variants, config.torch_threads)
    vocab_size = hf.ModelConfig.from_hf_folder(hf_dir).vocab_size
    results = []
    for case in config.cases():
      result = run_case(case, runners, config, vocab_size)
      results.append(result)
      if on_case is not None:
        on_case(result)
  return results


@dataclasses.dataclass(frozen=True)
class GemmResult:
  """One fp32 GEMM [m, k] x [k, n] alone: the ceiling a GEMM-bound forward can reach."""

  shape: tuple[int, int, int]  # (m, k, n): plain GEMM dims, not the shape legend's letters
  xla_ms: float  # best of the repeats
  torch_ms: float
  max_abs_diff: float  # XLA against torch, same inputs

  def gflops(self, ms: float) -> float:
    m, k, n = self.shape
    return 2 * m * k * n / (ms * 1e-3) / 1e9


def parse_gemm_shape(text: str) -> tuple[int, int, int]:
  """'32x256x768' -> (32, 256, 768); ValueError naming the text otherwise."""
  parts = text.lower().split("x")
  if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"a GEMM shape is MxKxN with positive integers, got {text!r}")
  return tuple(int(p) for p in parts)


def time_gemms(shapes: Sequence[tuple[int, int, int]], repeats: int = 200,
               seed: int = 0) -> list[GemmResult]:
  """Times a jitted XLA dot and a torch matmul per shape, round-robin, best of `repeats`.

  This is the diagnostic behind the verdict in docs/notes/measurement.md: when the forward is
  GEMM-bound, the ratio of the libraries' GEMM speeds bounds the ratio of the forwards.
  """
  import torch

  dot = jax.jit(jnp.matmul)
  rng = np.random.default_rng(seed)
  results = []
  for m, k, n in shapes:
    a = rng.standard_normal((m, k), np.float32)
    b = rng.standard_normal((k, n), np.float32)
    xa, xb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    calls = {"xla": lambda: dot(xa, xb).block_until_ready(), "torch": lambda: ta @ tb}
    for call in calls.values():  # compile / warm caches
      call(), call()
    best = {name: float("inf") for name in calls}
    for _ in range(repeats):
      for name, call in calls.items():
        start = time.perf_counter()
        call()
        best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    diff = float(np.abs(np.asarray(dot(xa, xb)) - (ta @ tb).numpy()).max())
    results.append(GemmResult((m, k, n), best["xla"], best["torch"], diff))
  return results


def gemm_table(results: Sequence[GemmResult]):
  from rich.table import Table

  table = Table(title="One fp32 GEMM alone, best of the repeats (GFLOP/s = 2MKN / time)")
  for column in ("M x K x N", "XLA ms", "torch ms", "XLA GFLOP/s", "torch GFLOP/s",
                 "torch / XLA time", "max |diff|"):
    table.add_column(column, justify="right")
  for r in results:
    table.add_row("x".join(map(str, r.shape)), f"{r.xla_ms:.3f}", f"{r.torch_ms:.3f}",
                  f"{r.gflops(r.xla_ms):.0f}", f"{r.gflops(r.torch_ms):.0f}",
                  f"{r.xla_ms / r.torch_ms:.2f}", f"{r.max_abs_diff:.1e}")
  return table


def environment() -> dict[str, str]:
  """What the timings depend on: versions, threads, cores."""
  import torch
  import transformers

  return {
      "jax": jax.__version__, "jax backend": jax.default_backend(),
      "torch": torch.__version__, "torch threads": str(torch.get_num_threads()),
      "transformers": transformers.__version__, "cpu cores": str(os.cpu_count()),
      "load average (1 min)": f"{os.getloadavg()[0]:.2f}",
  }


def results_table(results: Sequence[CaseResult], variants: Sequence[str],
                  statistic: str = "median"):
  """A rich table: ms per variant (median or min of the repeats), jax's speed-up over each
  torch variant, and the logit check."""
  from rich.table import Table

  table = Table(title=f"Tree-verification forward and decode step: {statistic} ms per call "
                      "(x: that variant's time / jax time, > 1 means jax is faster)")
  table.add_column("case")
  for variant in variants:
    table.add_column(f"{variant} ms", justify="right")
  torch_variants = [v for v in variants if v != "jax"]
  if "jax" in variants:
    for variant in torch_variants:
      table.add_column(f"x {variant.removeprefix('torch-')}", justify="right")
  table.add_column(f"max |logit diff| (atol {LOGIT_ATOL:g})", justify="right")
  for result in results:
    cells = [result.case.label]
    for variant in variants:
      r = result.results[variant]
      cells.append("failed" if r.error else f"{getattr(r, f'{statistic}_ms'):.2f}")
    if "jax" in variants:
      for variant in torch_variants:
        ratio = result.ratio(variant, statistic)
        cells.append("-" if ratio is None else f"{ratio:.2f}")
    diffs = [r.max_abs_logit_diff for v, r in result.results.items()
             if r.max_abs_logit_diff is not None]
    worst = max(diffs) if diffs else None
    cells.append("-" if worst is None else
                 f"{worst:.1e} {'ok' if worst <= LOGIT_ATOL else 'MISMATCH'}")
    table.add_row(*cells)
  return table


def errors_of(results: Sequence[CaseResult]) -> list[str]:
  return [f"{r.case.label} {name}: {v.error}" for r in results for name, v in r.results.items()
          if v.error]


def plot_results(results: Sequence[CaseResult], variants: Sequence[str], path: str,
                 title: str = "") -> str:
  """Two panels: median ms per call of every variant per case (log scale, with the p25-p75
  spread as error bars), and jax's speed-up over each torch variant (torch ms / jax ms, median;
  the dashed line at 1 is parity). A failed variant is left out of its case."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  labels = [r.case.label.replace("verify ", "").replace("decode ", "dec ") for r in results]
  x = np.arange(len(results))
  width = 0.8 / max(len(variants), 1)
  fig, (times_ax, ratio_ax) = plt.subplots(2, 1, figsize=(max(8, 0.7 * len(results)), 7),
                                           sharex=True)
  for i, variant in enumerate(variants):
    offset = (i - (len(variants) - 1) / 2) * width
    ok = [(k, r.results[variant]) for k, r in enumerate(results)
          if variant in r.results and r.results[variant].error is None]
    if not ok:
      continue
    where = np.asarray([k for k, _ in ok]) + offset
    median = np.asarray([v.median_ms for _, v in ok])
    spread = np.asarray([[v.median_ms - v.p25_ms for _, v in ok],
                         [v.p75_ms - v.median_ms for _, v in ok]])
    times_ax.bar(where, median, width, yerr=spread, capsize=2, label=variant)
    if variant != "jax":
      ratios = [(k, r.ratio(variant)) for k, r in enumerate(results)]
      ratios = [(k, q) for k, q in ratios if q is not None]
      if ratios:
        ratio_ax.bar(np.asarray([k for k, _ in ratios]) + offset, [q for _, q in ratios], width,
                     label=f"vs {variant}", color=f"C{i}")
  times_ax.set_yscale("log")
  times_ax.set_ylabel("ms per call (median)")
  times_ax.grid(axis="y", alpha=0.3, which="both")
  times_ax.legend(fontsize="small", ncol=len(variants))
  if title:
    times_ax.set_title(title)
  ratio_ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
  ratio_ax.set_ylabel("jax speed-up (torch ms / jax ms)")
  ratio_ax.grid(axis="y", alpha=0.3)
  ratio_ax.legend(fontsize="small", ncol=len(variants))
  ratio_ax.set_xticks(x, labels, rotation=30, ha="right")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------------------
# The launcher's runs (`launch/bench_backends.py`): progress lines, tables, plot and JSON.


def case_line(result: CaseResult) -> str:
  """One progress line per finished case: each variant's median ms, or 'failed'."""
  return f"{result.case.label}: " + ", ".join(
      f"{name} {'failed' if v.error else f'{v.median_ms:.2f} ms'}"
      for name, v in result.results.items())


def gemms_json(gemms: Sequence[GemmResult], environment: dict[str, str]) -> dict:
  return {"gemms": [dataclasses.asdict(g) for g in gemms], "environment": environment}


def results_json(config: BenchConfig, environment: dict[str, str],
                 results: Sequence[CaseResult]) -> dict:
  return {"config": dataclasses.asdict(config), "environment": environment,
          "cases": [dataclasses.asdict(r) for r in results]}


def plot_title(config: BenchConfig, environment: dict[str, str]) -> str:
  threads = ("library default threads" if not config.torch_threads else
             "1 thread" if config.torch_threads == 1 else f"{config.torch_threads} threads")
  return (f"XLA vs PyTorch, prefix {config.prefix_len}, {threads}, "
          f"load {environment['load average (1 min)']}")


def _write_json(data: dict, path: str) -> None:
  with open(path, "w") as f:
    json.dump(data, f, indent=2)


def run_gemms(shapes: Sequence[tuple[int, int, int]], *, repeats: int, seed: int = 0,
              torch_threads: int | None = None, out_json: str | None = None,
              console=None) -> list[GemmResult]:
  """The --gemm_shapes run: times the GEMMs (at least one repeat), prints their table and the
  environment, and writes the JSON when asked."""
  from rich.console import Console

  if torch_threads:
    import torch
    torch.set_num_threads(torch_threads)
  gemms = time_gemms(shapes, repeats=max(repeats, 1), seed=seed)
  console = console or Console(width=160)
  console.print(gemm_table(gemms))
  env = environment()  # one reading for the screen and the file
  console.print(env)
  if out_json:
    _write_json(gemms_json(gemms, env), out_json)
  return gemms


def run(hf_dir: str | None, config: BenchConfig, *, out_json: str | None = None,
        plot: str | None = None, console=None) -> list[CaseResult]:
  """The model run: every case (a line each as it finishes), the median and min tables, the
  errors, the environment, and the plot and JSON when asked."""
  from rich.console import Console

  console = console or Console(width=220)
  results = run_benchmark(hf_dir, config, on_case=lambda r: console.print(case_line(r)))
  for statistic in ("median", "min"):
    console.print(results_table(results, config.variants, statistic))
  for error in errors_of(results):
    console.print(f"[red]{error}[/red]")
  env = environment()
  console.print(env)
  if plot:
    plot_results(results, config.variants, plot, title=plot_title(config, env))
    console.print(f"plot: {plot}")
  if out_json:
    _write_json(results_json(config, env, results), out_json)
  return results
