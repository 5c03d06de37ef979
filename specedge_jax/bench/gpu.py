"""The verifier at the paper's scale on one accelerator (issue 13; the logic of
`launch/bench_gpu.py`).

One prepared run for a machine with a GPU, whose time is scarce: every section is written to
`<out_dir>/bench_gpu.json` as soon as it is done (a run cut short keeps what it measured), a
section that fails records its error and the next one runs, and an out-of-memory point of the
grid is recorded and skipped. Sections, in the order they run:

  device          device_kind, backend, jax version, memory, the peak bandwidth MBU divides by
                  (`PEAK_BANDWIDTH` by device kind, or --peak_bw_gbs; none on CPU), and a
                  measured device-to-device copy bandwidth beside it
  models          target and draft shapes, parameters, bytes one step reads, memory needed
  verify_grid     the target's verify step: median wall time of one jitted `spec.verify.verify`
                  (forward + sampling + acceptance + compaction) over the engine's own
                  layerwise state and bf16 cache, for B lanes of T tree tokens over a prefix of
                  P rows, with `attend_len` from the engine's live-prefix buckets. T = 1 is the
                  decode step. Each point: compile seconds, median ms, bytes read, MBU
  hlo             per-layer weight copies in the target's compiled verify (`models/hlo.py`):
                  the engine's layerwise state against the stacked `lax.scan` state, counts and
                  bytes; where memory allows, the stacked state is also timed at the decode
                  step and at the largest T, beside the layerwise times
  draft_decode    the draft's decode step (T = 1) per B, the same way
  acceptance      tokens per verification of the embedded pair per tree size T (budget T - 1),
                  and by depth (`bench/core.measure_acceptance`), or read from --acceptance_json
  replay          SpecEdge against server-only decoding, per server-compute second, with the
                  acceptance above REPLAYED onto the measured step times (see `replay`)
  bf16_agreement  greedy agreement of the embedded pair in bf16 (`bench/bf16_agreement.py`)

and a PNG (`bench_gpu.png`): verify time against T per B, MBU, and the replayed ratio.

Weights are random bf16 made on the device (`random_model`: shapes from `nnx.eval_shape`, one
jitted draw per leaf in bf16, no fp32 copy anywhere): a step's time depends on shapes, not on
values. The full and quick profiles use the Qwen3-14B target and Qwen3-1.7B draft shapes
(configs/hf/, the pair of configs/qwen3_14b_1_7b.py); tiny uses small shapes, for a CPU test.

Expected time of `--profile=quick` on one H200 (not yet measured on a GPU): about 4-6 minutes.
Compilation dominates: 6 target points and 2 draft points, each its own XLA program, and the
engine's layerwise state unrolls all 40 (28) layers into it, so each compile takes on the order
of 10-30 s (XLA:CPU compiles the same 14B programs in 7.5-12.7 s on a 2-core box); the
stacked-scan check adds three compiles of a one-layer loop body (2-3 s each on that CPU). The
timed calls are cheap: a 14B bf16 step reads ~28 GB, ~6-7 ms at 4.8 TB/s, so 12 calls x 10
points is about a second. The random weights (twice for the target: layerwise and stacked, plus
the engine's one-time unstacking copy) take seconds. The embedded-pair sections (acceptance: 2
trees; agreement: 4 generation runs) take about 1-2 minutes, mostly compiling small programs.
Process start and GPU initialization: ~15-20 s. `--compilation_cache_dir` makes a rerun on the
same machine skip most compiles; `--sections` runs a subset.

This module measures and reports; it never changes an engine or the model.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from specedge_jax.models.model_config import ModelConfig, tiny_config

GIB = 2**30
PAPER_RATIO = 2.22  # SpecEdge's published server-throughput gain over server-only decoding

# Peak memory bandwidth in bytes/s by `jax.devices()[0].device_kind` (vendor datasheets). An
# entry matches when every one of its lowercase substrings is in the lowercased device kind; the
# first match wins, so more specific entries come first (GH200 before H200, H100 PCIe before
# H100).
PEAK_BANDWIDTH: tuple[tuple[tuple[str, ...], float], ...] = (
    (("gh200",), 4.0e12),
    (("h200",), 4.8e12),
    (("h100", "pcie"), 2.0e12),
    (("h100", "nvl"), 3.9e12),
    (("h100",), 3.35e12),  # SXM
    (("h800",), 3.35e12),
    (("a100", "80gb", "pcie"), 1.935e12),
    (("a100", "80gb"), 2.039e12),
    (("a100",), 1.555e12),  # 40 GB
    (("l40s",), 8.64e11),
    (("l40",), 8.64e11),
    (("l4",), 3.0e11),
    (("a10g",), 6.0e11),
    (("a10",), 6.0e11),
    (("rtx 4090",), 1.008e12),
    (("rtx 3090",), 9.36e11),
    (("v100",), 9.0e11),
    (("t4",), 3.2e11),
)


def peak_bandwidth(device_kind: str) -> float | None:
  """The datasheet peak memory bandwidth (bytes/s) of a device kind, None if unknown (CPU)."""
  kind = device_kind.lower()
  for needles, bandwidth in PEAK_BANDWIDTH:
    if all(n in kind for n in needles):
      return bandwidth
  return None


# ----------------------------------------------------------------------------------------------
# Profiles


def _repo_hf_config(name: str) -> str:
  import specedge_jax

  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(specedge_jax.__file__))),
                      "configs", "hf", name)


def load_hf_config(path: str) -> ModelConfig:
  """A `ModelConfig` from an HF config.json file (or a folder holding one)."""
  if os.path.isdir(path):
    return ModelConfig.from_hf_folder(path)
  with open(path) as f:
    return ModelConfig.from_hf_dict(json.load(f))


@dataclasses.dataclass(frozen=True)
class Profile:
  """What one run measures. T counts tree nodes with the root (T = 1: decode)."""

  name: str
  target: ModelConfig
  draft: ModelConfig
  tree_sizes: tuple[int, ...]
  batch_sizes: tuple[int, ...]
  prefix_len: int  # committed rows of every lane
  max_len: int  # cache rows per slot
  repeats: int  # timed calls per point, after `warmup` untimed ones
  warmup: int = 2
  attention_min_rows: int = 128  # the engine's smallest live-prefix bucket
  copy_bytes: int = 2 * GIB  # buffer of the copy-bandwidth check
  acceptance_prompts: int = 8
  acceptance_tokens: int = 64
  agreement_prompts: int = 8
  agreement_tokens: int = 64
  agreement_tree: str = "32:4:16:32"
  agreement_batch: int = 4

  def __post_init__(self):
    if 1 not in self.tree_sizes:
      raise ValueError("the grid needs T = 1: the decode step every ratio is taken against")
    if min(self.tree_sizes) < 1 or min(self.batch_sizes) < 1:
      raise ValueError("tree and batch sizes must be >= 1")
    if self.prefix_len + max(self.tree_sizes) > self.max_len:
      raise ValueError(f"prefix {self.prefix_len} + T {max(self.tree_sizes)} exceeds max_len "
                       f"{self.max_len}")


PROFILES = ("full", "quick", "tiny")


def make_profile(name: str, *, target_config: str | None = None,
                 draft_config: str | None = None, **overrides) -> Profile:
  """The named profile; `target_config`/`draft_config` (HF config.json paths) replace its
  shapes, and `overrides` (Profile fields, e.g. tree_sizes) its other settings."""
  if name not in PROFILES:
    raise ValueError(f"unknown profile {name!r}; expected one of {PROFILES}")
  if name == "tiny":
    # Small enough for a CPU end-to-end test, large enough that a step is not pure overhead.
    fields: dict[str, Any] = dict(
        target=tiny_config("qwen3", vocab_size=1024, hidden_size=128, intermediate_size=384,
                           num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32),
        draft=tiny_config("qwen3", vocab_size=1024, hidden_size=64, intermediate_size=128,
                          num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32),
        tree_sizes=(1, 8), batch_sizes=(1, 2), prefix_len=64, max_len=256, repeats=3,
        warmup=1, attention_min_rows=64, copy_bytes=64 * 2**20, acceptance_prompts=2,
        acceptance_tokens=16, agreement_prompts=2, agreement_tokens=16, agreement_tree="4:4:2:8",
        agreement_batch=1)
  else:
    fields = dict(target=load_hf_config(_repo_hf_config("qwen3_14b.json")),
                  draft=load_hf_config(_repo_hf_config("qwen3_1_7b.json")),
                  prefix_len=512, max_len=2048)
    if name == "full":
      fields.update(tree_sizes=(1, 8, 16, 32, 64), batch_sizes=(1, 4, 8, 16), repeats=20,
                    acceptance_prompts=16, agreement_prompts=16)
    else:
      fields.update(tree_sizes=(1, 8, 32), batch_sizes=(1, 8), repeats=10)
  if target_config:
    fields["target"] = load_hf_config(target_config)
  if draft_config:
    fields["draft"] = load_hf_config(draft_config)
  fields.update({k: v for k, v in overrides.items() if v is not None})
  return Profile(name=name, **fields)


# ----------------------------------------------------------------------------------------------
# Bytes a step reads, MBU, and the replay: plain arithmetic (tested without a model).


def parameter_count(config: ModelConfig) -> int:
  from specedge_jax.models import transformer

  return transformer.count_parameters(config)


def weight_bytes(config: ModelConfig, bytes_per_param: int = 2) -> int:
  """All weights, as held in memory."""
  return parameter_count(config) * bytes_per_param


def weight_bytes_read(config: ModelConfig, bytes_per_param: int = 2) -> int:
  """Weight bytes one forward reads: all of them, except an untied embedding table, of which a
  step gathers only its tokens' rows (a tied one is read whole by the LM head)."""
  embedding = config.vocab_size * config.hidden_size * bytes_per_param
  total = weight_bytes(config, bytes_per_param)
  return total if config.tie_word_embeddings else total - embedding


def kv_row_bytes(config: ModelConfig, bytes_per_value: int = 2) -> int:
  """Bytes of one cache row of one slot: keys and values of every layer."""
  return 2 * config.num_layers * config.num_kv_heads * config.head_dim * bytes_per_value


def kv_bytes_read(config: ModelConfig, batch: int, attend_len: int,
                  bytes_per_value: int = 2) -> int:
  """KV bytes a step reads: every lane reads `attend_len` rows of its slot (the bucket; the
  mask is applied after the read), in every layer."""
  return batch * attend_len * kv_row_bytes(config, bytes_per_value)


def mbu(bytes_read: int, seconds: float, peak_bytes_per_s: float | None) -> float | None:
  """Memory-bandwidth utilization: bytes read / step time / peak bandwidth (None: no peak)."""
  if not peak_bytes_per_s or seconds <= 0:
    return None
  return bytes_read / seconds / peak_bytes_per_s


def tree_spec_for(tree_tokens: int) -> str:
  """The SpecExec tree of T nodes (budget T - 1) the acceptance is measured with: the
  reference's shape (32 beams, depth 4, 16 children) with beams and children capped by the
  budget."""
  if tree_tokens < 2:
    raise ValueError("a tree needs at least 2 nodes (T = 1 is decoding)")
  budget = tree_tokens - 1
  return f"{min(32, budget)}:4:{min(16, budget)}:{budget}"


REPLAY_DEFINITION = (
    "REPLAY, not a serving run: server throughput per second of server compute, at a full "
    "batch of B requests. SpecEdge: edges draft, the server only verifies, so it emits "
    "B * E_T tokens per verify step (E_T: mean tokens per verification of a T-node tree), "
    "i.e. B * E_T / t_verify(B, T) tokens per second. "
    "Server-only autoregressive: B tokens per decode step: B / t_decode(B) = "
    "B / t_verify(B, 1). ratio = E_T * t_decode(B) / t_verify(B, T). E_T is the embedded "
    "pair's measured acceptance (a tiny draft of a tiny target), replayed onto the step times "
    "measured here; prefill, network and drafting stalls are not counted. The paper reports "
    f"{PAPER_RATIO}x.")


def replay(points: Sequence[Mapping[str, Any]],
           tokens_per_verify: Mapping[int, float]) -> list[dict[str, Any]]:
  """SpecEdge vs server-only throughput per (B, T) of the grid (`REPLAY_DEFINITION`).

  `points` are verify-grid points ({'batch_size', 'tree_tokens', 'median_ms'}, median_ms None
  for a failed point); `tokens_per_verify` maps T to E[tokens per verify]. Points without a
  decode step of their B, or without acceptance at their T, are left out."""
  times = {(p["batch_size"], p["tree_tokens"]): p.get("median_ms") for p in points}
  rows = []
  for (batch, tree_tokens), verify_ms in sorted(times.items()):
    decode_ms = times.get((batch, 1))
    expected = tokens_per_verify.get(tree_tokens)
    if tree_tokens == 1 or not verify_ms or not decode_ms or expected is None:
      continue
    specedge = batch * expected / (verify_ms / 1e3)
    server_only = batch / (decode_ms / 1e3)
    rows.append({"batch_size": batch, "tree_tokens": tree_tokens,
                 "tokens_per_verify": expected, "verify_ms": verify_ms, "decode_ms": decode_ms,
                 "specedge_tokens_per_compute_s": specedge,
                 "server_only_tokens_per_compute_s": server_only,
                 "ratio": specedge / server_only, "ratio_vs_paper": specedge / server_only /
                 PAPER_RATIO})
  return rows


def best_ratio_per_batch(rows: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
  best: dict[int, dict[str, Any]] = {}
  for row in rows:
    if row["batch_size"] not in best or row["ratio"] > best[row["batch_size"]]["ratio"]:
      best[row["batch_size"]] = dict(row)
  return best


def memory_need(profile: Profile, bytes_per_value: int = 2) -> dict[str, int]:
  """Device bytes the target needs: its weights and cache while measuring (steady), and while
  the engine is built (peak: `split_model(..., layerwise=True)` copies the stacked layer weights
  into per-layer arrays while the stacked ones still exist)."""
  weights = weight_bytes(profile.target, bytes_per_value)
  cache = (max(profile.batch_sizes) * profile.max_len
           * kv_row_bytes(profile.target, bytes_per_value))
  return {"weights": weights, "cache": cache, "steady": weights + cache,
          "peak": 2 * weights + cache}


# ----------------------------------------------------------------------------------------------
# Models and timing (JAX from here on).


def random_model(config: ModelConfig, seed: int = 0, dtype: str = "bf16"):
  """A `Transformer` with random weights in `dtype`, drawn on the default device.

  The model's shapes come from `nnx.eval_shape` (nothing allocated), then one jitted call draws
  every leaf directly in `dtype` (normal, std 0.02; norm scales 1): no fp32 copy of a 14B model
  ever exists."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from specedge_jax.models import transformer

  param_dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32, "fp16": jnp.float16}[dtype]
  abstract = nnx.eval_shape(lambda: transformer.Transformer(
      config, dtype=param_dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  graphdef, shapes = nnx.split(abstract)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)

  def leaf(path, shape, key):
    if not jnp.issubdtype(shape.dtype, jnp.floating):
      return jnp.zeros(shape.shape, shape.dtype)
    if any(getattr(k, "key", None) == "scale" for k in path):
      return jnp.ones(shape.shape, shape.dtype)
    return (0.02 * jax.random.normal(key, shape.shape, shape.dtype)).astype(shape.dtype)

  @jax.jit
  def draw(key):
    keys = jax.random.split(key, len(flat))
    return jax.tree_util.tree_unflatten(
        treedef, [leaf(path, shape, k) for (path, shape), k in zip(flat, keys)])

  return nnx.merge(graphdef, draw(jax.random.PRNGKey(seed)))


def is_out_of_memory(error: BaseException) -> bool:
  text = str(error)
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                 "OOM"))


def _short(error: BaseException, limit: int = 400) -> str:
  text = f"{type(error).__name__}: {error}"
  return text if len(text) <= limit else text[:limit] + " ..."


def time_calls(call: Callable[[], Any], *, warmup: int, repeats: int) -> float:
  """Median seconds of `call()` over `repeats` timed calls after `warmup` untimed ones; `call`
  must block until its results are ready."""
  times = []
  for i in range(warmup + repeats):
    start = time.perf_counter()
    call()
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return statistics.median(times)


def copy_bandwidth(nbytes: int, repeats: int = 10) -> dict[str, float]:
  """Device-to-device bandwidth of an elementwise pass over `nbytes` of bf16 (read + write
  counted), for comparison with the datasheet peak."""
  import jax
  import jax.numpy as jnp

  x = jnp.ones((nbytes // 2,), jnp.bfloat16)
  step = jax.jit(lambda a: a * 2)
  seconds = time_calls(lambda: jax.block_until_ready(step(x)), warmup=2, repeats=repeats)
  return {"bytes": int(nbytes), "median_ms": 1e3 * seconds,
          "bytes_per_s": 2 * nbytes / seconds}


class StepTimer:
  """Compiles and times the engine-level jitted verify for one model: `engine`'s graphdef,
  layerwise state and bf16 cache, `attend_len` from its buckets. An out-of-memory point is
  recorded (and a donated cache rebuilt) instead of raised."""

  def __init__(self, engine, profile: Profile, peak: float | None):
    self.engine, self.profile, self.peak = engine, profile, peak
    self.rng = np.random.default_rng(0)
    self.texts: dict[tuple[int, int], str] = {}  # (B, T) -> compiled HLO text, when kept

  def inputs(self, batch: int, tree_tokens: int):
    from specedge_jax.bench import core as core_bench
    from specedge_jax.models import kv_cache as kv

    attend_len = kv.attend_rows(self.profile.prefix_len + tree_tokens, self.engine.attend_buckets)
    args = core_bench.verify_inputs(self.rng, self.engine.config.vocab_size, batch, tree_tokens,
                                    self.profile.prefix_len)
    return args, attend_len

  def point(self, batch: int, tree_tokens: int, keep_text: bool = False, graphdef=None,
            model_state=None) -> dict[str, Any]:
    """One (B, T) point, over the engine's weights or over (`graphdef`, `model_state`)."""
    import jax

    from specedge_jax.models import kv_cache as kv
    from specedge_jax.spec import verify as verify_lib

    engine, config = self.engine, self.engine.config
    graphdef = graphdef or engine.graphdef
    model_state = engine.state if model_state is None else model_state
    args, attend_len = self.inputs(batch, tree_tokens)
    row = {"batch_size": batch, "tree_tokens": tree_tokens, "prefix_len": self.profile.prefix_len,
           "attend_len": attend_len, "compile_s": None, "median_ms": None,
           "achieved_bytes_per_s": None,
           "weight_bytes_read": weight_bytes_read(config),
           "kv_bytes_read": kv_bytes_read(config, batch, attend_len), "mbu": None, "error": None}
    row["bytes_read"] = row["weight_bytes_read"] + row["kv_bytes_read"]
    try:
      start = time.perf_counter()
      compiled = verify_lib.verify.lower(graphdef, model_state, engine.cache, *args,
                                         attend_len=attend_len).compile()
      row["compile_s"] = time.perf_counter() - start
      if keep_text:
        self.texts[(batch, tree_tokens)] = compiled.as_text()

      def call():
        # The cache is donated: each call's output cache is the next call's input.
        engine.cache, *outs = compiled(model_state, engine.cache, *args)
        jax.block_until_ready((engine.cache, outs))

      seconds = time_calls(call, warmup=self.profile.warmup, repeats=self.profile.repeats)
      row["median_ms"] = 1e3 * seconds
      row["achieved_bytes_per_s"] = row["bytes_read"] / seconds
      row["mbu"] = mbu(row["bytes_read"], seconds, self.peak)
    except Exception as error:  # pylint: disable=broad-except (recorded, the grid goes on)
      if not is_out_of_memory(error):
        raise
      row["error"] = "out of memory: " + _short(error)
      if engine.cache.k.is_deleted():  # donated into the call that failed
        engine.cache = kv.KVCache.init(config, engine.num_slots, engine.max_len,
                                       engine.cache.k.dtype)
    return row


def room_for(config: ModelConfig, margin: float = 1.15) -> bool:
  """Whether the default device has room for another bf16 copy of `config`'s weights (True
  where it does not report its memory, e.g. CPU)."""
  import jax

  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except (backends without memory stats)
    stats = {}
  if "bytes_limit" not in stats:
    return True
  return stats["bytes_limit"] - stats.get("bytes_in_use", 0) >= margin * weight_bytes(config)


def make_engine(model, profile: Profile):
  """A `TargetEngine` over `model` with a bf16 cache of max(B) slots; the caller drops `model`
  (the engine holds its own per-layer copies of the weights)."""
  import jax.numpy as jnp

  from specedge_jax import engine as E

  batch = max(profile.batch_sizes)
  return E.TargetEngine(model, num_slots=batch, max_len=profile.max_len,
                        max_tree_nodes=max(profile.tree_sizes), max_batch_size=batch,
                        cache_dtype=jnp.bfloat16, attention_min_rows=profile.attention_min_rows)


def weight_copy_report(timer: StepTimer, point: tuple[int, int], *,
                       time_stacked: bool = False,
                       layerwise_points: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
  """Per-layer weight copies in the target's compiled verify at `point` (B, T), for the engine's
  layerwise state (the grid's compiled text when it kept one, else compiled here) and for the
  stacked scan state (`split_model` without layerwise, compiled from shapes alone: nothing is
  allocated).

  With `time_stacked` (memory permitting: a second copy of the weights), the stacked state also
  gets random weights and is timed at the decode step (min B, T = 1) and at `point`, beside the
  layerwise times of the grid (`layerwise_points`): the detector reads instructions, the times
  say whether they cost anything."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from specedge_jax.models import hlo, transformer
  from specedge_jax.spec import verify as verify_lib

  engine = timer.engine
  config = engine.config
  shapes = hlo.layer_weight_shapes(config)
  args, attend_len = timer.inputs(*point)
  abstract_cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), engine.cache)
  layerwise_text = timer.texts.get(point) or hlo.compiled_text(
      verify_lib.verify, engine.graphdef, engine.state, abstract_cache, *args,
      attend_len=attend_len)
  abstract = nnx.eval_shape(lambda: transformer.Transformer(
      config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  stacked_graphdef, stacked_state = transformer.split_model(abstract)
  start = time.perf_counter()
  stacked_text = hlo.compiled_text(verify_lib.verify, stacked_graphdef, stacked_state,
                                   abstract_cache, *args, attend_len=attend_len)
  stacked_compile_s = time.perf_counter() - start

  def summary(text: str, runs_per_call: int) -> dict[str, Any]:
    copies = hlo.weight_copies(text, shapes)
    nbytes = sum(c.nbytes for c in copies)
    return {"count": len(copies), "bytes": nbytes,
            "bytes_per_call_estimate": nbytes * runs_per_call,
            "examples": [str(c) for c in copies[:8]],
            # XLA:GPU can feed a GEMM straight from a slice of the stacked buffer (a dynamic-slice
            # fusion): its slice is then counted above but copies nothing. These say if it did.
            "address_computation_fusions": text.count("address_computation"),
            "dynamic_slice_fusions": text.count("dynamic_slice_fusion")}

  report = {
      "point": {"batch_size": point[0], "tree_tokens": point[1], "attend_len": attend_len},
      "layer_weight_shapes": sorted(list(s) for s in shapes),
      "weight_bytes_read_per_step": weight_bytes_read(config),
      # Unrolled: each copy found runs once per call. Scan: the copies sit in the loop body,
      # which runs once per layer.
      "layerwise": summary(layerwise_text, 1),
      "stacked_scan": dict(summary(stacked_text, config.num_layers),
                           compile_s=stacked_compile_s),
      "note": ("count/bytes: weight-shaped slice, copy or transpose instructions in the "
               "optimized HLO (models/hlo.weight_copies); bytes_per_call_estimate multiplies the "
               "scan's by num_layers (its loop body runs once per layer)"),
  }
  del layerwise_text, stacked_text
  if time_stacked:
    weights = transformer.split_model(random_model(config, seed=2))[1]
    layerwise_ms = {(p["batch_size"], p["tree_tokens"]): p["median_ms"] for p in layerwise_points}
    timings = []
    for batch, tree_tokens in dict.fromkeys([(point[0], 1), point]):
      row = timer.point(batch, tree_tokens, graphdef=stacked_graphdef, model_state=weights)
      timings.append({"batch_size": batch, "tree_tokens": tree_tokens,
                      "stacked_scan_ms": row["median_ms"],
                      "layerwise_ms": layerwise_ms.get((batch, tree_tokens)),
                      "error": row["error"]})
    report["timed"] = timings
    del weights
  return report


# ----------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass(frozen=True)
class Options:
  profile: Profile
  out_dir: str
  peak_bw_gbs: float | None = None  # overrides the device-kind table
  acceptance_json: str | None = None  # replay acceptance from here instead of measuring it
  sections: tuple[str, ...] = ()  # empty: all
  target_dir: str | None = None  # the embedded pair (default: the package's assets)
  draft_dir: str | None = None


SECTIONS = ("device", "models", "verify_grid", "hlo", "draft_decode", "acceptance", "replay",
            "bf16_agreement")


def default_out_dir(device_kind: str, profile: str) -> str:
  safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in device_kind.strip()).strip("-")
  return os.path.join("results", "gpu", f"{safe or 'device'}-{profile}")


def device_info(peak_override_gbs: float | None) -> dict[str, Any]:
  import jax
  import jaxlib

  device = jax.devices()[0]
  kind = device.device_kind
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except (CPU backends may not report memory)
    stats = {}
  table = peak_bandwidth(kind)
  peak = peak_override_gbs * 1e9 if peak_override_gbs else table
  return {"device_kind": kind, "platform": device.platform, "backend": jax.default_backend(),
          "num_devices": jax.device_count(), "jax_version": jax.__version__,
          "jaxlib_version": getattr(jaxlib, "__version__", None),
          "bytes_limit": stats.get("bytes_limit"), "peak_bandwidth_bytes_per_s": peak,
          "peak_bandwidth_source": ("--peak_bw_gbs" if peak_override_gbs else
                                    "PEAK_BANDWIDTH table" if table else
                                    "none (MBU n/a; give --peak_bw_gbs)")}


def _config_json(config: ModelConfig) -> dict[str, Any]:
  out = dataclasses.asdict(config)
  out["parameters"] = parameter_count(config)
  out["weight_bytes_bf16"] = weight_bytes(config)
  out["weight_bytes_read_per_step"] = weight_bytes_read(config)
  out["kv_row_bytes_bf16"] = kv_row_bytes(config)
  return out


def load_acceptance_json(path: str) -> dict[int, float]:
  """T -> E[tokens per verify] from a JSON file: this module's output (its 'acceptance'
  section) or {'acceptance': {'per_tree': [{'tree_tokens': T, 'tokens_per_verify': E}]}} or a
  plain {"T": E} mapping."""
  with open(path) as f:
    data = json.load(f)
  section = data.get("acceptance", data)
  rows = section.get("per_tree") if isinstance(section, dict) else None
  if rows is None:
    return {int(t): float(e) for t, e in section.items()}
  return {int(r["tree_tokens"]): float(r["tokens_per_verify"]) for r in rows}


def measure_embedded_acceptance(profile: Profile, target_dir: str, draft_dir: str
                                ) -> dict[str, Any]:
  """Tokens per verification of the embedded pair at every T > 1 of the grid, greedy, fp32."""
  from specedge_jax.bench import core as core_bench
  from specedge_jax.checkpoints import orbax_io
  from specedge_jax.data import prompts as prompts_lib
  from specedge_jax.data import tokenizers

  target, draft = orbax_io.load_model(target_dir), orbax_io.load_model(draft_dir)
  tokenizer = tokenizers.load_tokenizer(target_dir)
  ids = prompts_lib.encode_all(tokenizer, prompts_lib.load_records())[:profile.acceptance_prompts]
  trees = {t: tree_spec_for(t) for t in profile.tree_sizes if t > 1}
  results = core_bench.measure_acceptance(target, draft, ids, list(trees.values()),
                                          max_new_tokens=profile.acceptance_tokens)
  per_tree = [{"tree_tokens": t, "tree": r.tree_spec, "tokens_per_verify": r.mean_accepted,
               "by_depth": list(r.by_depth), "emitted_counts": list(r.emitted_counts),
               "verifications": r.steps, "identical_to_target_only": r.identical}
              for t, r in zip(trees, results)]
  return {"source": "measured on the embedded pair (bench/core.measure_acceptance, greedy, fp32)",
          "num_prompts": len(ids), "max_new_tokens": profile.acceptance_tokens,
          "per_tree": per_tree,
          "by_depth_note": "by_depth[d-1] = P(a verification emits >= d tokens)"}


class _Results:
  """The JSON being built, written out after every section."""

  def __init__(self, path: str, head: dict[str, Any]):
    self.path, self.data = path, dict(head, sections_done=[], errors={})

  def put(self, section: str, value: Any) -> None:
    self.data[section] = value
    self.data["sections_done"].append(section)
    self.write()

  def fail(self, section: str, message: str) -> None:
    self.data[section] = {"error": message}
    self.data["errors"][section] = message
    self.write()

  def write(self) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    with open(self.path + ".tmp", "w") as f:
      json.dump(self.data, f, indent=2, default=_json_default)
    os.replace(self.path + ".tmp", self.path)


def _json_default(value):
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating,)):
    return float(value)
  if isinstance(value, (tuple, set)):
    return list(value)
  return str(value)


def run(options: Options, console=None) -> dict[str, Any]:
  """Runs every asked section in order (module docstring); returns the JSON's contents."""
  from rich.console import Console
  from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                             TimeElapsedColumn)

  from specedge_jax.data import assets

  console = console or Console(width=None if sys.stdout.isatty() else 160)
  profile = options.profile
  wanted = set(options.sections or SECTIONS)
  unknown = wanted - set(SECTIONS)
  if unknown:
    raise ValueError(f"unknown sections {sorted(unknown)}; known: {SECTIONS}")
  target_dir = options.target_dir or assets.DEFAULT_TARGET_DIR
  draft_dir = options.draft_dir or assets.DEFAULT_DRAFT_DIR
  started = time.perf_counter()
  results = _Results(os.path.join(options.out_dir, "bench_gpu.json"),
                     {"profile": profile.name, "grid": {"tree_sizes": list(profile.tree_sizes),
                                                        "batch_sizes": list(profile.batch_sizes),
                                                        "prefix_len": profile.prefix_len,
                                                        "max_len": profile.max_len,
                                                        "repeats": profile.repeats,
                                                        "warmup": profile.warmup},
                      "section_wall_s": {}})

  def section(name: str, body: Callable[[], Any]) -> Any:
    if name not in wanted:
      return None
    start = time.perf_counter()
    try:
      value = body()
    except Exception as error:  # pylint: disable=broad-except (recorded; next section runs)
      console.print(f"[red]{name} failed:[/red] {_short(error, 2000)}")
      results.fail(name, _short(error, 4000) + "\n" + traceback.format_exc(limit=8))
      value = None
    else:
      results.put(name, value)
    results.data["section_wall_s"][name] = time.perf_counter() - start
    results.write()
    return value

  device = device_info(options.peak_bw_gbs)
  results.data["device"] = device  # always: every figure needs it
  if "device" in wanted:
    device = section("device", lambda: dict(device, copy_bandwidth=copy_bandwidth(
        profile.copy_bytes))) or device
  peak = device["peak_bandwidth_bytes_per_s"]
  console.print(f"device: {device['device_kind']} ({device['backend']}), jax "
                f"{device['jax_version']}, peak bandwidth "
                f"{'n/a' if not peak else f'{peak / 1e12:.3f} TB/s'}; profile {profile.name}")

  need = memory_need(profile)
  limit = device.get("bytes_limit")
  fits = limit is None or need["steady"] <= limit
  section("models", lambda: {"target": _config_json(profile.target),
                             "draft": _config_json(profile.draft), "weights_dtype": "bf16",
                             "kv_cache_dtype": "bf16", "memory_need_bytes": need,
                             "device_bytes_limit": limit, "fits": fits})
  if not fits:
    console.print(f"[red]the {profile.name} profile needs {need['steady'] / GIB:.1f} GiB for the "
                  f"target's weights and cache, the device has {limit / GIB:.1f} GiB: the target "
                  "sections are skipped[/red]")
  elif limit is not None and need["peak"] > limit:
    console.print(f"[yellow]building the engine peaks near {need['peak'] / GIB:.1f} GiB (the "
                  f"layer weights are copied once); the device has {limit / GIB:.1f} GiB[/yellow]")

  grid = [(b, t) for b in profile.batch_sizes for t in profile.tree_sizes]
  hlo_point = (min(profile.batch_sizes), max(profile.tree_sizes))
  total = ((len(grid) if "verify_grid" in wanted else 0) + ("hlo" in wanted)
           + (len(profile.batch_sizes) if "draft_decode" in wanted else 0))
  columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
             TimeElapsedColumn())
  target: dict[str, Any] = {}  # the target's engine and timer, built once for both sections

  with Progress(*columns, console=console) as progress:
    task = progress.add_task("grid", total=total)

    def target_timer() -> StepTimer:
      if "error" in target:
        raise RuntimeError(f"no target engine: {target['error']}")
      if "timer" not in target:
        try:
          if not fits:
            raise MemoryError(f"the target needs {need['steady']} bytes (weights + cache), "
                              f"the device has {limit}")
          progress.update(task, description="target: random bf16 weights, engine")
          engine = make_engine(random_model(profile.target), profile)
          gc.collect()  # the stacked weights of the random model go now
          target["timer"] = StepTimer(engine, profile, peak)
        except Exception as error:  # pylint: disable=broad-except (both sections report it)
          target["error"] = _short(error)
          raise
      return target["timer"]

    def verify_grid():
      timer = target_timer()
      points = []
      for batch, tree_tokens in grid:
        progress.update(task, description=f"target verify B={batch} T={tree_tokens}")
        points.append(timer.point(batch, tree_tokens, keep_text=(batch, tree_tokens) == hlo_point))
        progress.console.print(point_line("target", points[-1]))
        progress.advance(task)
      return {"model": "target", "points": points}

    grid_section = section("verify_grid", verify_grid)

    def weight_copies():
      timer = target_timer()
      progress.update(task, description="hlo: weight copies, layerwise and stacked scan")
      report = weight_copy_report(timer, hlo_point, time_stacked=room_for(profile.target),
                                  layerwise_points=(grid_section or {}).get("points", ()))
      for row in report.get("timed", ()):
        progress.console.print(f"stacked scan vs layerwise B={row['batch_size']} "
                               f"T={row['tree_tokens']}: {_fmt(row['stacked_scan_ms'], '.3f')} "
                               f"vs {_fmt(row['layerwise_ms'], '.3f')} ms")
      progress.advance(task)
      return report

    section("hlo", weight_copies)
    target.clear()
    gc.collect()

    def draft_decode():
      progress.update(task, description="draft: random bf16 weights, engine")
      timer = StepTimer(make_engine(random_model(profile.draft, seed=1), profile), profile, peak)
      gc.collect()
      points = []
      for batch in profile.batch_sizes:
        progress.update(task, description=f"draft decode B={batch}")
        points.append(timer.point(batch, 1))
        progress.console.print(point_line("draft", points[-1]))
        progress.advance(task)
      return {"model": "draft", "points": points}

    section("draft_decode", draft_decode)
    progress.update(task, description="grid done")
  gc.collect()

  acceptance = None
  if "acceptance" in wanted or "replay" in wanted:
    if options.acceptance_json:
      path = options.acceptance_json
      acceptance = section("acceptance", lambda: {
          "source": f"loaded from {path}",
          "per_tree": [{"tree_tokens": t, "tokens_per_verify": e}
                       for t, e in sorted(load_acceptance_json(path).items())]})
    else:
      from specedge_jax.bench import bf16_agreement

    with console.status("acceptance of the embedded pair ..."), bf16_agreement.precision("fp32"):
      acceptance = section("acceptance",
                           lambda: measure_embedded_acceptance(profile, target_dir, draft_dir))

  def replay_section():
    if not grid_section or not acceptance:
      raise ValueError("the replay needs the verify grid and the acceptance sections")
    expected = {r["tree_tokens"]: r["tokens_per_verify"] for r in acceptance["per_tree"]}
    rows = replay(grid_section["points"], expected)
    return {"definition": REPLAY_DEFINITION, "paper_ratio": PAPER_RATIO,
            "acceptance_source": acceptance["source"], "rows": rows,
            "best_per_batch": {str(b): r for b, r in best_ratio_per_batch(rows).items()}}

  replayed = section("replay", replay_section)

  def agreement_section():
    from specedge_jax.bench import bf16_agreement
    from specedge_jax.data import prompts as prompts_lib
    from specedge_jax.data import tokenizers

    tokenizer = tokenizers.load_tokenizer(target_dir)
    ids = prompts_lib.encode_all(tokenizer, prompts_lib.load_records())[:profile.agreement_prompts]
    # Not strict: a lossy fp32 path is recorded as this section's error below, with the bf16
    # figures kept beside it.
    report = bf16_agreement.measure(target_dir, draft_dir, ids,
                                    max_new_tokens=profile.agreement_tokens,
                                    tree_spec=profile.agreement_tree,
                                    batch_size=profile.agreement_batch, tokenizer=tokenizer,
                                    strict=False)
    console.print(bf16_agreement.summary_table(report))
    data = report.to_json()
    data.pop("outputs")  # the tokens themselves stay in launch.bench_bf16's own JSON
    return data

  with console.status("bf16 agreement of the embedded pair ..."):
    agreement = section("bf16_agreement", agreement_section)
  if agreement and not agreement["fp32_exact"]:
    results.data["errors"]["bf16_agreement"] = ("fp32 speculative output differs from fp32 "
                                                "target-only output: a lossy verifier")
    console.print(f"[red]{results.data['errors']['bf16_agreement']}[/red]")

  results.data["total_wall_s"] = time.perf_counter() - started
  results.write()
  if grid_section or (results.data.get("draft_decode") or {}).get("points"):
    plot_path = os.path.join(options.out_dir, "bench_gpu.png")
    try:
      plot(results.data, plot_path)
      results.data["plot"] = plot_path
      results.write()
    except Exception as error:  # pylint: disable=broad-except (the JSON is what matters)
      results.data["errors"]["plot"] = _short(error)
      results.write()
  console.print(grid_table(results.data))
  if replayed:
    console.print(replay_table(replayed))
  console.print(f"json: {results.path} ({results.data['total_wall_s']:.0f} s)")
  return results.data


# ----------------------------------------------------------------------------------------------
# Tables and plot.


def _fmt(value, spec: str = ".2f", none: str = "-") -> str:
  return none if value is None else format(value, spec)


def point_line(model: str, p: Mapping[str, Any]) -> str:
  """One log line per measured point: a log cut short still shows how far the grid got."""
  if p["error"]:
    return f"{model} B={p['batch_size']} T={p['tree_tokens']}: {p['error'][:200]}"
  utilization = "n/a" if p["mbu"] is None else f"{100 * p['mbu']:.1f}%"
  return (f"{model} B={p['batch_size']} T={p['tree_tokens']} attend={p['attend_len']}: "
          f"compile {p['compile_s']:.1f} s, median {p['median_ms']:.3f} ms, "
          f"{p['achieved_bytes_per_s'] / 1e9:.3g} GB/s, MBU {utilization}")


def grid_table(data: Mapping[str, Any]):
  from rich.table import Table

  table = Table(title=f"verify step, {data['device']['device_kind']}, profile {data['profile']}, "
                f"prefix {data['grid']['prefix_len']} (T=1: decode)")
  for column in ("model", "B", "T", "attend rows", "compile s", "median ms", "x of T=1",
                 "GB read", "GB/s", "MBU"):
    table.add_column(column, justify="right")
  for name in ("verify_grid", "draft_decode"):
    points = (data.get(name) or {}).get("points") or []
    base = {p["batch_size"]: p["median_ms"] for p in points if p["tree_tokens"] == 1}
    for p in points:
      ratio = (p["median_ms"] / base[p["batch_size"]]
               if p["median_ms"] and base.get(p["batch_size"]) else None)
      table.add_row((data.get(name) or {}).get("model", name), str(p["batch_size"]),
                    str(p["tree_tokens"]), str(p["attend_len"]), _fmt(p["compile_s"], ".1f"),
                    _fmt(p["median_ms"], ".3f", p["error"] or "-"), _fmt(ratio),
                    f"{p['bytes_read'] / 1e9:.3g}",
                    _fmt(p.get("achieved_bytes_per_s") and p["achieved_bytes_per_s"] / 1e9, ".3g"),
                    _fmt(p["mbu"] and 100 * p["mbu"], ".1f", "n/a") + ("%" if p["mbu"] else ""))
  return table


def replay_table(replayed: Mapping[str, Any]):
  from rich.table import Table

  table = Table(title=f"REPLAY: SpecEdge vs server-only, tokens per server-compute second "
                f"(paper: {PAPER_RATIO}x); acceptance {replayed['acceptance_source']}",
                caption=replayed["definition"])
  for column in ("B", "T", "tokens/verify", "verify ms", "decode ms", "SpecEdge tok/s",
                 "server-only tok/s", "ratio", "of paper's"):
    table.add_column(column, justify="right")
  for r in replayed["rows"]:
    table.add_row(str(r["batch_size"]), str(r["tree_tokens"]), f"{r['tokens_per_verify']:.2f}",
                  f"{r['verify_ms']:.3f}", f"{r['decode_ms']:.3f}",
                  f"{r['specedge_tokens_per_compute_s']:.0f}",
                  f"{r['server_only_tokens_per_compute_s']:.0f}", f"{r['ratio']:.2f}x",
                  f"{r['ratio_vs_paper']:.0%}")
  return table


def _log2_ticks(ax, values: Sequence[int]) -> None:
  ax.set_xscale("log", base=2)
  ax.set_xticks(list(values), [str(v) for v in values])
  ax.minorticks_off()


def plot(data: Mapping[str, Any], path: str) -> str:
  """verify ms vs T per B (draft decode marked), MBU per point, and the replayed ratio."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  points = [p for p in (data.get("verify_grid") or {}).get("points") or [] if p["median_ms"]]
  draft = [p for p in (data.get("draft_decode") or {}).get("points") or [] if p["median_ms"]]
  rows = (data.get("replay") or {}).get("rows") or []
  batches = sorted({p["batch_size"] for p in points} | {p["batch_size"] for p in draft})
  colors = {b: plt.cm.viridis(i / max(1, len(batches) - 1)) for i, b in enumerate(batches)}
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))

  ax = axes[0]
  for batch in batches:
    series = sorted((p for p in points if p["batch_size"] == batch),
                    key=lambda p: p["tree_tokens"])
    if series:
      ax.plot([p["tree_tokens"] for p in series], [p["median_ms"] for p in series], marker="o",
              color=colors[batch], label=f"target B={batch}")
    for p in draft:
      if p["batch_size"] == batch:
        ax.scatter([1], [p["median_ms"]], marker="x", color=colors[batch],
                   label=f"draft decode B={batch}")
  _log2_ticks(ax, sorted({p["tree_tokens"] for p in points}) or [1])
  ax.set_xlabel("tree tokens per request (T; 1 = decode)")
  ax.set_ylabel("verify step, median ms")
  ax.set_title("verify step time vs T")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)

  ax = axes[1]
  # Achieved bandwidth per point, against the datasheet peak and the measured copy; bars carry
  # their MBU when the peak is known.
  trees = sorted({p["tree_tokens"] for p in points})
  width = 0.8 / max(1, len(batches))
  for i, batch in enumerate(batches):
    series = [next((p for p in points if p["batch_size"] == batch and p["tree_tokens"] == t),
                   None) for t in trees]
    bars = ax.bar(np.arange(len(trees)) + i * width,
                  [p["achieved_bytes_per_s"] / 1e9 if p else 0 for p in series], width,
                  color=colors[batch], label=f"B={batch}")
    labels = [f"{100 * p['mbu']:.0f}%" if p and p["mbu"] else "" for p in series]
    ax.bar_label(bars, labels, fontsize=6)
  peak = data["device"].get("peak_bandwidth_bytes_per_s")
  if peak:
    ax.axhline(peak / 1e9, color="red", linestyle="--", label="datasheet peak")
  copy = data["device"].get("copy_bandwidth")
  if copy:
    ax.axhline(copy["bytes_per_s"] / 1e9, color="gray", linestyle=":", label="measured copy")
  ax.set_xticks(np.arange(len(trees)) + width * (len(batches) - 1) / 2, [str(t) for t in trees])
  ax.set_xlabel("tree tokens per request (T)")
  ax.set_ylabel("GB/s read (weights + attended KV rows)")
  ax.set_title("target: bandwidth achieved, MBU on bars" if peak else
               "target: bandwidth achieved (MBU n/a: no peak)")
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=7)

  ax = axes[2]
  for batch in batches:
    series = sorted((r for r in rows if r["batch_size"] == batch), key=lambda r: r["tree_tokens"])
    if series:
      ax.plot([r["tree_tokens"] for r in series], [r["ratio"] for r in series], marker="o",
              color=colors[batch], label=f"B={batch}")
  ax.axhline(PAPER_RATIO, color="red", linestyle="--", label=f"paper {PAPER_RATIO}x")
  ax.axhline(1.0, color="gray", linestyle=":")
  _log2_ticks(ax, sorted({r["tree_tokens"] for r in rows}) or [2])
  ax.set_xlabel("tree tokens per request (T)")
  ax.set_ylabel("SpecEdge / server-only, per server-compute s")
  ax.set_title("REPLAYED acceptance: server throughput ratio")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)

  fig.suptitle(f"{data['device']['device_kind']} ({data['device']['backend']}, jax "
               f"{data['device']['jax_version']}), profile {data['profile']}, bf16, prefix "
               f"{data['grid']['prefix_len']}")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
