"""What each piece of simulated work costs, in seconds: the cost curves the simulator runs on.

What this module owns: the verify-cost curve t(B, tree tokens, context) in three kinds, a table
of measured points (`TableCost`: `bench_core`'s verify curve, a `bench_gpu` grid, or
`calibrate.py`'s measurement of the serving engine itself), and a roofline for a named GPU and
model shape (`RooflineCost`: a model, not a measurement); the GPU table and the model shapes
(read from configs/hf/*.json, counted without JAX); the prefill cost; the edge's costs
(`EdgeCosts`: draft per tree, commit, draft prefill); and `CostModel`, the bundle a simulation
takes. Pure: numpy and json, no JAX. It never measures (`calibrate.py` does).

A shape is (B lanes, T tree tokens over all lanes with their roots, C committed context rows over
all lanes), as in `serving/verify_time.BatchShape`; a decode step of B lanes is T = B.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from specedge_jax.serving.verify_time import BatchShape


class ForwardCost(Protocol):
  """t(B, T, C): the wall time of one batched forward of that shape, in seconds."""

  def seconds(self, shape: BatchShape) -> float: ...

  def describe(self) -> dict[str, Any]: ...


# ----------------------------------------------------------------------------------------------
# Measured tables


def _interpolate(xs: np.ndarray, ys: np.ndarray, x: float) -> float:
  """Piecewise-linear through the points, extended linearly past both ends (never below 0):
  a curve measured at T = 8 and 16 says something about T = 20, and nothing better is known."""
  if xs.size == 1:
    return float(ys[0])
  if x <= xs[0]:
    i = 0
  elif x >= xs[-1]:
    i = xs.size - 2
  else:
    i = int(np.searchsorted(xs, x)) - 1
  x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
  return max(float(y0 + (y1 - y0) * (x - x0) / (x1 - x0)), 0.0)


def next_power_of_two(n: int, cap: int) -> int:
  """The serving engine's batch bucket (`engine/prefill.bucket`): the next power of two, at most
  `cap` (the engine's max batch size)."""
  bucket = 1
  while bucket < n:
    bucket *= 2
  return min(bucket, max(cap, n))


@dataclasses.dataclass(frozen=True)
class TableCost:
  """A forward-cost table measured at points (B, tree tokens per lane) -> ms, interpolated in T
  per B and then across B. The context is not a feature: every point was measured at one prefix
  (`prefix_len`), which is what this curve stands for.

  `batch_buckets`: look B up at the engine's power-of-two bucket (a curve measured at bucket sizes
  only); `tree_capacity`: every lane padded to this many tree nodes (the JAX engine pads trees to
  `max_tree_nodes`, so a smaller tree costs the same)."""

  points: tuple[tuple[int, int, float], ...]  # (B, T per lane, ms)
  source: str
  prefix_len: int | None = None
  batch_buckets: int = 0  # 0: no bucketing; else the engine's max batch size
  tree_capacity: int = 0  # 0: no padding

  def __post_init__(self):
    if not self.points:
      raise ValueError(f"a cost table needs points ({self.source})")
    for b, t, ms in self.points:
      if b < 1 or t < 1 or not (math.isfinite(ms) and ms > 0):
        raise ValueError(f"cost table point {(b, t, ms)} is not a measurement ({self.source})")
    table: dict[int, list[tuple[int, float]]] = {}
    for b, t, ms in self.points:
      table.setdefault(int(b), []).append((int(t), float(ms)))
    per_batch = {b: (np.array([t for t, _ in sorted(v)], float),
                     np.array([m for _, m in sorted(v)])) for b, v in sorted(table.items())}
    object.__setattr__(self, "_per_batch", per_batch)  # frozen: set once, here

  def ms(self, batch_size: int, tokens_per_lane: float) -> float:
    per_batch = self._per_batch
    if self.batch_buckets:
      batch_size = next_power_of_two(batch_size, self.batch_buckets)
    if self.tree_capacity:
      tokens_per_lane = self.tree_capacity
    batches = np.array(sorted(per_batch), float)
    at_b = np.array([_interpolate(*per_batch[int(b)], tokens_per_lane) for b in batches])
    return _interpolate(batches, at_b, batch_size)

  def seconds(self, shape: BatchShape) -> float:
    if shape.batch_size < 1:
      return 0.0
    return self.ms(shape.batch_size, shape.tree_tokens / shape.batch_size) / 1000.0

  def describe(self) -> dict[str, Any]:
    return {"kind": "measured table", "source": self.source, "prefix_len": self.prefix_len,
            "batch_buckets": self.batch_buckets, "tree_capacity": self.tree_capacity,
            "points": [list(p) for p in self.points]}


class _CachedTable:
  """A `TableCost` with its lookups memoized: the simulator asks the same few shapes millions of
  times, and a table lookup in Python costs ~20 us."""

  def __init__(self, table: TableCost):
    self.table = table
    self._cache: dict[tuple[int, float], float] = {}

  def seconds(self, shape: BatchShape) -> float:
    if shape.batch_size < 1:
      return 0.0
    key = (shape.batch_size, shape.tree_tokens / shape.batch_size)
    value = self._cache.get(key)
    if value is None:
      value = self._cache[key] = self.table.seconds(shape)
    return value

  def describe(self) -> dict[str, Any]:
    return self.table.describe()


def cached(cost: ForwardCost) -> ForwardCost:
  return _CachedTable(cost) if isinstance(cost, TableCost) else cost


def verify_table_from_bench_core(path: str) -> TableCost:
  """`launch.bench_core --out_json` verify curve: one jitted `spec.verify.verify` per (B, T),
  median wall time, over a prefix of `prefix_len` rows (the file's, else bench_core's 128)."""
  with open(path) as f:
    data = json.load(f)
  points = tuple((int(p["batch_size"]), int(p["tree_tokens"]), float(p["median_ms"]))
                 for p in data["verify_curve"])
  return TableCost(points, source=f"bench_core verify curve ({path})",
                   prefix_len=int(data.get("prefix_len", 128)))


def tables_from_bench_gpu(path: str) -> dict[str, TableCost]:
  """`launch.bench_gpu` JSON (`bench/gpu.py`): the target's verify grid ('verify', with its T = 1
  points also as 'decode') and the draft's decode step ('draft_decode'), failed points left out."""
  with open(path) as f:
    data = json.load(f)
  out: dict[str, TableCost] = {}
  device = data.get("device", {}).get("device_kind", "?")

  def rows(section: str, only_t1: bool = False):
    points = (data.get(section) or {}).get("points", ())
    return tuple((int(p["batch_size"]), int(p["tree_tokens"]), float(p["median_ms"]))
                 for p in points if p.get("median_ms") and (not only_t1 or p["tree_tokens"] == 1))

  prefix = None
  for section, name, only_t1 in (("verify_grid", "verify", False), ("verify_grid", "decode", True),
                                 ("draft_decode", "draft_decode", False)):
    points = rows(section, only_t1)
    if points:
      grid = (data.get(section) or {}).get("points", ())
      prefix = grid[0].get("prefix_len") if grid else None
      out[name] = TableCost(points, source=f"bench_gpu {section} on {device} ({path})",
                            prefix_len=prefix)
  if "verify" not in out:
    raise ValueError(f"{path}: no measured verify_grid points")
  return out


# ----------------------------------------------------------------------------------------------
# Roofline


@dataclasses.dataclass(frozen=True)
class GPU:
  name: str
  bandwidth_bytes_per_s: float  # datasheet peak memory bandwidth
  peak_flops: float  # datasheet dense bf16 tensor FLOP/s
  memory_bytes: float


# Datasheet peaks (dense bf16, no sparsity). The A100 row is the issue's; the rest are NVIDIA's
# datasheets (H100 and H200 SXM; RTX 4090 at fp16 accumulate, the consumer card's best case).
GPUS: Mapping[str, GPU] = {
    "A100-80GB": GPU("A100-80GB", 2.039e12, 312e12, 80e9),
    "H100": GPU("H100", 3.35e12, 989e12, 80e9),
    "H200": GPU("H200", 4.8e12, 989e12, 141e9),
    "L4": GPU("L4", 3.0e11, 121e12, 24e9),
    "RTX 4090": GPU("RTX 4090", 1.008e12, 165e12, 24e9),
}



@dataclasses.dataclass(frozen=True)
class ModelShape:
  """A decoder's shape, enough to count parameters, bytes and FLOPs (Qwen3 / Llama layout)."""

  name: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  tie_word_embeddings: bool = False
  qk_norm: bool = True

  @classmethod
  def from_hf_json(cls, path: str, name: str = "") -> "ModelShape":
    with open(path) as f:
      hf = json.load(f)
    heads = int(hf["num_attention_heads"])
    return cls(name=name or os.path.basename(path), vocab_size=int(hf["vocab_size"]),
               hidden_size=int(hf["hidden_size"]), intermediate_size=int(hf["intermediate_size"]),
               num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
               num_kv_heads=int(hf.get("num_key_value_heads", heads)),
               head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
               tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
               qk_norm=hf.get("model_type") == "qwen3")

  @property
  def parameters(self) -> int:
    d, h = self.hidden_size, self.head_dim
    attention = d * self.num_heads * h * 2 + d * self.num_kv_heads * h * 2  # q, o; k, v
    mlp = 3 * d * self.intermediate_size
    norms = 2 * d + (2 * h if self.qk_norm else 0)
    embedding = self.vocab_size * d
    head = 0 if self.tie_word_embeddings else embedding
    return self.num_layers * (attention + mlp + norms) + embedding + head + d

  @property
  def matmul_parameters(self) -> int:
    """Parameters a token multiplies by: all but an untied embedding table (a gather)."""
    embedding = self.vocab_size * self.hidden_size
    return self.parameters - (0 if self.tie_word_embeddings else embedding)

  def weight_bytes_read(self, bytes_per_param: int = 2) -> int:
    """What `bench/gpu.weight_bytes_read` counts: every weight but an untied embedding table."""
    return self.matmul_parameters * bytes_per_param

  def kv_row_bytes(self, bytes_per_value: int = 2) -> int:
    return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_value


def kv_slots(gpu: GPU, model: ModelShape, max_len: int, *, headroom: float = 0.9,
             bytes_per_param: int = 2) -> int:
  """Sessions of `max_len` rows whose KV cache fits beside the weights in `headroom` of the
  GPU's memory (activations left out: a model)."""
  free = gpu.memory_bytes * headroom - model.parameters * bytes_per_param
  return max(int(free // (max_len * model.kv_row_bytes(bytes_per_param))), 0)


def _hf_config_dir() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  return os.path.join(os.path.dirname(os.path.dirname(here)), "configs", "hf")


MODEL_FILES: Mapping[str, str] = {"Qwen3-14B": "qwen3_14b.json", "Qwen3-1.7B": "qwen3_1_7b.json",
                                  "Qwen3-32B": "qwen3_32b.json"}


def model_shape(name: str) -> ModelShape:
  """A named shape from configs/hf (the configs of configs/qwen3_14b_1_7b.py)."""
  if name not in MODEL_FILES:
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODEL_FILES)}")
  return ModelShape.from_hf_json(os.path.join(_hf_config_dir(), MODEL_FILES[name]), name)


@dataclasses.dataclass(frozen=True)
class RooflineCost:
  """time = max(bytes read / bandwidth, FLOPs / peak FLOP/s) + fixed overhead. A model.

  Bytes: the weights once per forward (`ModelShape.weight_bytes_read`) plus every lane's KV rows
  (context and tree). FLOPs: 2 x matmul parameters per token, plus attention, 4 x layers x heads
  x head_dim per (query token, attended row). The efficiencies scale the peaks (1.0: the ideal
  roofline; real kernels reach less), the overhead is per forward (launches, host work)."""

  gpu: GPU
  model: ModelShape
  bytes_per_param: int = 2
  overhead_s: float = 1e-3
  bandwidth_efficiency: float = 1.0
  flops_efficiency: float = 1.0

  def bytes_read(self, shape: BatchShape) -> float:
    rows = shape.context_tokens + shape.tree_tokens
    return float(self.model.weight_bytes_read(self.bytes_per_param) +
                 rows * self.model.kv_row_bytes(self.bytes_per_param))

  def flops(self, shape: BatchShape) -> float:
    m = self.model
    lanes = max(shape.batch_size, 1)
    # Each lane's T_l queries attend over its C_l + T_l rows; with the totals only, lanes are
    # taken as equal: sum_l T_l (C_l + T_l) = T (C + T) / B.
    attended = shape.tree_tokens * (shape.context_tokens + shape.tree_tokens) / lanes
    return (2.0 * m.matmul_parameters * shape.tree_tokens +
            4.0 * m.num_layers * m.num_heads * m.head_dim * attended)

  def seconds(self, shape: BatchShape) -> float:
    if shape.batch_size < 1:
      return 0.0
    memory = self.bytes_read(shape) / (self.gpu.bandwidth_bytes_per_s * self.bandwidth_efficiency)
    compute = self.flops(shape) / (self.gpu.peak_flops * self.flops_efficiency)
    return max(memory, compute) + self.overhead_s

  def describe(self) -> dict[str, Any]:
    return {"kind": "roofline (a model, not a measurement)", "gpu": dataclasses.asdict(self.gpu),
            "model": self.model.name, "parameters": self.model.parameters,
            "weight_bytes_read": self.model.weight_bytes_read(self.bytes_per_param),
            "kv_row_bytes": self.model.kv_row_bytes(self.bytes_per_param),
            "overhead_s": self.overhead_s, "bandwidth_efficiency": self.bandwidth_efficiency,
            "flops_efficiency": self.flops_efficiency,
            "formula": "max(bytes / bandwidth, flops / peak) + overhead"}


# ----------------------------------------------------------------------------------------------
# Prefill and the edge


@dataclasses.dataclass(frozen=True)
class LinearCost:
  """fixed + per_unit x units (seconds): a prefill over prompt tokens, fitted to measurements."""

  fixed_s: float
  per_unit_s: float
  source: str = ""

  def seconds(self, units: float) -> float:
    return self.fixed_s + self.per_unit_s * units

  def describe(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PrefillFromForward:
  """A prefill as one forward of the prompt's tokens (B = 1, no context): for a roofline."""

  forward: ForwardCost

  def seconds(self, units: float) -> float:
    return self.forward.seconds(BatchShape(1, int(max(units, 1)), 0))

  def describe(self) -> dict[str, Any]:
    return {"kind": "prefill = one forward of the prompt", "forward": self.forward.describe()}


@dataclasses.dataclass(frozen=True)
class EdgeCosts:
  """An edge device's work (seconds), each a job on its one device (`serving/drafter.EdgeDevice`):
  draft = fixed + per_step x growth steps + per_node x budget; commit (after each answer), draft
  prefill (fixed + per prompt token), close."""

  draft_fixed_s: float
  draft_per_step_s: float
  commit_s: float
  open_fixed_s: float
  open_per_token_s: float = 0.0
  draft_per_node_s: float = 0.0
  close_s: float = 0.0
  # The edge's CPU work per Verify call outside its device (protobuf, gRPC, TLS, asyncio; half
  # before the send, half after the answer): it runs beside the device on the edge's processors,
  # so it only costs time where they are shared (`SpecEdgeSpec.shared_edge_cores`).
  rpc_cpu_s: float = 0.0
  source: str = ""

  def draft_s(self, depth: int, budget: int) -> float:
    return self.draft_fixed_s + self.draft_per_step_s * depth + self.draft_per_node_s * budget

  def open_s(self, prompt_tokens: int) -> float:
    return self.open_fixed_s + self.open_per_token_s * prompt_tokens

  def describe(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def roofline(cls, gpu: GPU, model: ModelShape, *, beams: int, context: int = 512,
               overhead_s: float = 1e-3) -> "EdgeCosts":
    """An edge GPU drafting with `model`: each growth step forwards the `beams` expanded nodes
    over the prompt's rows; a commit forwards the accepted path (about one decode step); the draft
    prefill is one forward of the prompt (taken at `context` tokens). A model."""
    forward = RooflineCost(gpu, model, overhead_s=overhead_s)
    step = forward.seconds(BatchShape(1, beams, context))
    decode = forward.seconds(BatchShape(1, 1, context))
    prefill = forward.seconds(BatchShape(1, context, 0))
    return cls(draft_fixed_s=0.0, draft_per_step_s=step, commit_s=decode,
               open_fixed_s=prefill, source=f"roofline: {model.name} on {gpu.name} (a model)")


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Everything a simulation needs to cost its work.

  round_overhead_s: what a round spends outside the edge's CPU and device, the RTT and the
    verifier's queue and forward (the gRPC + TLS + event-loop path of one Verify, request and
    reply together, measured on loopback by `calibrate.py`, less the edge's `rpc_cpu_s`); opens
    and closes pay it too; half on each direction.
  reply_serial_s: the verifier's answers to one batch leave one after another (its event loop
    serializes them): the k-th answer of a batch (k = 0, 1, ...) leaves k x this later."""

  verify: ForwardCost
  decode: ForwardCost
  prefill: Any  # .seconds(prompt tokens)
  edge: EdgeCosts
  round_overhead_s: float = 0.0
  reply_serial_s: float = 0.0
  # The servicer's CPU per arriving call (parse, validate, hand-off). Where it shares a core with
  # the engine thread (`SpecEdgeSpec.shared_server_core`: a CPU verifier) it slows a running
  # forward; on a GPU server it runs beside it.
  server_request_cpu_s: float = 0.0
  # CPU work per unit of work when n processes share the edge cores: (n, factor) points, 1 at
  # n = 1 (caches and scheduling shared by n processes; measured by `calibrate.py`).
  edge_sharing_inflation: tuple[tuple[int, float], ...] = ()
  # Per-batch host work of the server's baseline loop (server-only serving), beyond the forward.
  server_only_step_overhead_s: float = 0.0
  label: str = ""

  def inflation(self, processes: int) -> float:
    """The measured CPU inflation at `processes` per shared core (interpolated; 1 without
    points)."""
    if not self.edge_sharing_inflation:
      return 1.0
    points = sorted(self.edge_sharing_inflation)
    return _interpolate(np.array([p for p, _ in points], float),
                        np.array([f for _, f in points], float), processes)

  def describe(self) -> dict[str, Any]:
    return {"label": self.label, "verify": self.verify.describe(),
            "decode": self.decode.describe(), "prefill": self.prefill.describe(),
            "edge": self.edge.describe(), "round_overhead_s": self.round_overhead_s,
            "reply_serial_s": self.reply_serial_s,
            "server_request_cpu_s": self.server_request_cpu_s,
            "edge_sharing_inflation": [list(p) for p in self.edge_sharing_inflation],
            "server_only_step_overhead_s": self.server_only_step_overhead_s}


def fit_linear(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
  """Least-squares (intercept, slope), both kept >= 0 (a cost never falls with more work)."""
  x, y = np.asarray(xs, float), np.asarray(ys, float)
  if x.size < 2 or np.ptp(x) == 0:
    return float(max(y.mean(), 0.0)), 0.0
  slope, intercept = np.polyfit(x, y, 1)
  if slope < 0:
    return float(max(y.mean(), 0.0)), 0.0
  if intercept < 0:
    return 0.0, float((x @ y) / (x @ x))
  return float(intercept), float(slope)


def cost_model_from_calibration(path: str, *, label: str = "") -> CostModel:
  """The CPU cost model `calibrate.py` measured (`launch.simulate --calibrate`).

  verify: the target's forward as the verifier serves it (`served_verify`: the real verifier
    driven over loopback; trees padded to the engine's capacity, so a smaller tree costs the
    same), else the bare engine call. decode, prefill: the bare engine (the server-only baseline
    runs in process). Edge: the bare draft engine's draft (per depth when it takes limits),
    commit and open, on the device; beside it, the rest of a drafter process's CPU per round
    (`served_draft` at one drafter: its process CPU per round less the device's draft and
    commit; else the gRPC client's CPU of the fakes' rig), and how a drafter's CPU per round
    grows with drafters per core (`served_draft` at 1, 2, 4). The servicer's CPU per request: half
    the fakes' rig's server CPU per round. Round overhead: the served rig's at one lane, less its
    fake drafter's CPU and the servicer's request CPU (charged on their cores); reply
    serialization: twice its slope over the batch size (the mean answer of a batch of B waits
    (B - 1) / 2 others)."""
  with open(path) as f:
    data = json.load(f)
  if data.get("format") != "specedge-sim-calibration":
    raise ValueError(f"{path} is not a calibration file (launch.simulate --calibrate)")
  engines = data["engines"]
  served = (data.get("served_verify") or {}).get("rows") or []
  rows = served or engines["verify"]
  capacity = int(rows[0]["tree_tokens"])
  verify = TableCost(tuple((r["batch_size"], r["tree_tokens"], r["median_ms"]) for r in rows),
                     source=("verifier forward as served on loopback" if served else
                             "bare engine verify") + f", measured ({path})",
                     tree_capacity=capacity)
  decode = TableCost(tuple((r["batch_size"], 1, r["median_ms"]) for r in engines["decode"]),
                     source=f"bare engine decode, measured ({path})")
  tokens, ms = zip(*engines["prefill"]["points"])
  fixed, per_token = fit_linear(tokens, ms)
  prefill = LinearCost(fixed / 1000.0, per_token / 1000.0, source=f"target prefill fit ({path})")
  draft = engines["draft"]
  per_depth = draft.get("per_depth") or []
  if len(per_depth) >= 2:
    draft_fixed, draft_step = fit_linear([p["depth"] for p in per_depth],
                                         [p["median_ms"] for p in per_depth])
  else:  # an engine without limits: one draft figure at the configured depth
    draft_fixed, draft_step = draft["draft_median_ms"], 0.0
  grpc = data.get("grpc") or {}
  rpc_cpu_ms = float(grpc.get("client_cpu_ms_per_round", 0.0))
  fake_client_cpu_ms = rpc_cpu_ms  # what the served rig's fake drafter spent per round
  by_drafters = {int(r["drafters"]): r for r in data.get("served_draft") or ()}
  inflation: tuple[tuple[int, float], ...] = ()
  if 1 in by_drafters:  # all of a drafter's CPU per round but its device's draft and commit
    one = by_drafters[1]["process_cpu_ms_per_round"]
    rpc_cpu_ms = max(one - draft["draft_median_ms"] - draft["commit_median_ms"], 0.0)
    inflation = tuple((n, r["process_cpu_ms_per_round"] / one)
                      for n, r in sorted(by_drafters.items()))
  server_request_cpu_ms = float(grpc.get("server_cpu_ms_per_round", 0.0)) / 2
  edge = EdgeCosts(draft_fixed_s=draft_fixed / 1000.0, draft_per_step_s=draft_step / 1000.0,
                   commit_s=draft["commit_median_ms"] / 1000.0,
                   open_fixed_s=draft["open_median_ms"] / 1000.0, rpc_cpu_s=rpc_cpu_ms / 1000.0,
                   source=f"bare draft engine, measured ({path})")
  if served:
    overhead_ms = float(served[0]["round_overhead_median_ms"])
    _, slope = fit_linear([r["batch_size"] for r in served],
                          [r["round_overhead_median_ms"] for r in served])
  else:
    overhead_ms, slope = float(grpc.get("round_overhead_median_ms", 0.0)), 0.0
  # The rig's overhead held its fake drafter's CPU and the servicer's request CPU, both of which
  # the simulator charges on their own cores.
  overhead_ms -= fake_client_cpu_ms + server_request_cpu_ms
  return CostModel(verify=verify, decode=decode, prefill=prefill, edge=edge,
                   round_overhead_s=max(overhead_ms, 0.0) / 1000.0,
                   reply_serial_s=2.0 * slope / 1000.0,
                   server_request_cpu_s=server_request_cpu_ms / 1000.0,
                   edge_sharing_inflation=inflation,
                   label=label or f"measured on this CPU ({os.path.basename(path)})")
