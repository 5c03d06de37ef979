"""The verifier's memory planner: will this model, cache and batch fit on these devices?

Given a model config, dtypes, cache length, slots, the largest verify batch and a mesh, it
computes per-device bytes for

- the weights: the model's parameter shapes from `nnx.eval_shape` (nothing is allocated), each
  divided as `models/sharding.py` places it;
- the KV cache: `jax.eval_shape` of `KVCache.init`, divided over kv heads (model axis) and
  slots (data axis);
- the activations of the largest verify batch (B = max_batch_size lanes of max_tree_nodes
  tokens attending over max_len rows): an estimate of the live intermediates of one decoder
  layer (layers run one after another) plus the logits and the sampling buffers after the last
  layer. It is an estimate of what XLA keeps live, checked against the compiled verify's own
  temp size in tests/engine/test_memory_plan.py.

`check_fits` refuses a plan over the devices' memory (times a headroom for XLA's own buffers and
fragmentation) with a `MemoryPlanError` that says what would fit: the most slots, or the model
axis the weights need. The verifier calls it before loading any weight.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specedge_jax.models import kv_cache as kv
from specedge_jax.models import sharding
from specedge_jax.models.model_config import ModelConfig

GIB = 1024**3
DEFAULT_HEADROOM = 0.9  # of the device's allocatable bytes, for XLA's own buffers


class MemoryPlanError(ValueError):
  """The configuration does not fit the devices; the message says what would."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Per-device bytes of one verifier configuration."""

  mesh: dict[str, int]
  num_slots: int
  weights_bytes: int
  kv_cache_bytes: int
  activation_bytes: int
  device_bytes: int | None  # what one device can allocate; None: unknown
  device_label: str = ""
  headroom: float = DEFAULT_HEADROOM
  # `plan`'s arguments, so advice can re-plan a changed configuration exactly.
  inputs: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def replan(self, **changes) -> "MemoryPlan":
    return plan(**dict(self.inputs, **changes))

  @property
  def total_bytes(self) -> int:
    return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes

  @property
  def budget_bytes(self) -> int | None:
    return None if self.device_bytes is None else int(self.device_bytes * self.headroom)

  @property
  def fits(self) -> bool:
    return self.budget_bytes is None or self.total_bytes <= self.budget_bytes

  @property
  def kv_bytes_per_slot(self) -> int:
    """Per device, for one more slot on every data shard (slots grow in data-axis steps)."""
    return self.kv_cache_bytes * self.mesh["data"] // self.num_slots

  def max_slots(self) -> int:
    """The most slots that fit beside the weights and activations (0 if none)."""
    if self.budget_bytes is None:
      return self.num_slots
    room = self.budget_bytes - self.weights_bytes - self.activation_bytes
    per_shard = max(room // max(self.kv_bytes_per_slot, 1), 0)
    return int(per_shard) * self.mesh["data"]

  def table(self) -> str:
    def gib(n):
      return f"{n / GIB:8.3f} GiB"

    rows = [("weights", self.weights_bytes), ("KV cache", self.kv_cache_bytes),
            ("activations (largest verify)", self.activation_bytes), ("total", self.total_bytes)]
    lines = [f"memory plan per device, mesh {self.mesh}, {self.num_slots} slots"
             + (f", device {self.device_label}" if self.device_label else "")]
    lines += [f"  {name:<30} {gib(n)}" for name, n in rows]
    if self.device_bytes is not None:
      lines.append(f"  {'budget':<30} {gib(self.budget_bytes)}  "
                   f"({self.headroom:.0%} of {self.device_bytes / GIB:.3f} GiB)")
    return "\n".join(lines)


def _dtype(dtype) -> np.dtype:
  return np.dtype(jnp.dtype(dtype))


def weights_per_device(config: ModelConfig, param_dtype, mesh: dict[str, int]) -> int:
  """Bytes of one device's share of the weights, from abstract shapes only."""
  from specedge_jax.models.transformer import Transformer  # pylint: disable=g-import-not-at-top

  abstract = nnx.eval_shape(lambda: Transformer(config, dtype=param_dtype,
                                                param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  state = nnx.state(abstract, nnx.Param)
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    spec = sharding.param_spec(path, leaf.shape, config, mesh)
    total += math.prod(sharding.shard_shape(leaf.shape, spec, mesh)) * _dtype(leaf.dtype).itemsize
  return int(total)


def kv_cache_per_device(config: ModelConfig, cache_dtype, num_slots: int, max_len: int,
                        mesh: dict[str, int]) -> int:
  cache = jax.eval_shape(lambda: kv.KVCache.init(config, num_slots, max_len, cache_dtype))
  per_array = math.prod(sharding.shard_shape(cache.k.shape, sharding.CACHE_SPEC, mesh))
  return int(2 * per_array * _dtype(cache_dtype).itemsize)


def verify_activations_per_device(config: ModelConfig, compute_dtype, *, batch: int,
                                  tree_tokens: int, attend_rows: int,
                                  mesh: dict[str, int]) -> int:
  """Live intermediates of the largest verify, per device (see the module docstring).

  Per layer (one at a time): the residual stream and its normed copy; q, k, v; the keys and
  values read from the cache for the attended rows; float32 scores and probabilities; the
  attention output; the MLP's gate, up and product. After the last layer: float32 logits over
  the (model-sharded when untied) vocabulary and sampling's sorted copy, cumulative sum and
  perturbed copy of them; and the tree masks."""
  model = mesh["model"]
  item = _dtype(compute_dtype).itemsize
  b, t, s = batch, tree_tokens, attend_rows
  heads, kv_heads = config.num_heads // model, config.num_kv_heads // model
  h, d, f = config.head_dim, config.hidden_size, config.intermediate_size // model
  per_layer = (
      3 * b * t * d * item  # residual, normed input, attention/MLP output before the add
      + b * t * (heads + 2 * kv_heads) * h * item  # q, k, v
      + 2 * b * s * kv_heads * h * item  # keys and values gathered for the attended rows
      + 2 * b * heads * t * s * 4  # float32 scores and probabilities
      + b * t * heads * h * item  # attention output
      + 3 * b * t * f * item)  # gate, up, silu(gate) * up
  vocab = config.vocab_size
  if not config.tie_word_embeddings and vocab % model == 0:
    vocab //= model
  after = 4 * b * t * vocab * 4 + b * t * s + 2 * b * t * t  # logits + sampling, masks
  return int(per_layer + after)


def device_capacity(devices=None) -> tuple[int | None, str]:
  """(bytes one device can allocate, label). GPUs report their allocator's limit; CPU devices
  share the host's memory, divided by the number of devices."""
  devices = list(jax.devices() if devices is None else devices)
  device = devices[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  label = f"{device.platform} {device.device_kind}"
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), label
  try:
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None, label
  return int(host // len(devices)), f"{label} (host memory / {len(devices)} devices)"


def plan(config: ModelConfig, *, param_dtype=jnp.float32, cache_dtype=None, max_len: int,
         num_slots: int, max_batch_size: int, max_tree_nodes: int,
         mesh: dict[str, int] | None = None, device_bytes: int | None = None,
         device_label: str = "", headroom: float = DEFAULT_HEADROOM) -> MemoryPlan:
  """The per-device plan of a verifier configuration (allocates nothing)."""
  inputs = dict(config=config, param_dtype=param_dtype, cache_dtype=cache_dtype,
                max_len=max_len, num_slots=num_slots, max_batch_size=max_batch_size,
                max_tree_nodes=max_tree_nodes, mesh=mesh, device_bytes=device_bytes,
                device_label=device_label, headroom=headroom)
  mesh = sharding.mesh_sizes(mesh or {})
  sharding.check_config(config, mesh, num_slots)
  cache_dtype = cache_dtype or param_dtype
  return MemoryPlan(inputs=inputs, 
      mesh=mesh, num_slots=num_slots,
      weights_bytes=weights_per_device(config, param_dtype, mesh),
      kv_cache_bytes=kv_cache_per_device(config, cache_dtype, num_slots, max_len, mesh),
      activation_bytes=verify_activations_per_device(
          config, param_dtype, batch=max_batch_size, tree_tokens=max_tree_nodes,
          attend_rows=max_len, mesh=mesh),
      device_bytes=device_bytes, device_label=device_label, headroom=headroom)


def check_fits(memory_plan: MemoryPlan) -> None:
  """MemoryPlanError when the plan does not fit, saying what would: the most slots, else the
  narrowest wider model axis (with the slots asked for) that fits, and bf16."""
  if memory_plan.fits:
    return
  p = memory_plan
  advice = []
  slots = p.max_slots()
  if slots >= max(p.mesh["data"], 1) and p.weights_bytes + p.activation_bytes < p.budget_bytes:
    advice.append(f"at most {slots} slots fit (server.num_slots), or a shorter server.max_len")
  else:
    advice.append("the weights and activations alone leave no room for one slot per data "
                  "shard")
  for m in (2, 4, 8, 16, 32, 64):
    if m <= p.mesh["model"]:
      continue
    try:
      wider = p.replan(mesh=dict(p.mesh, model=m))
    except ValueError:  # the mesh does not divide the heads or the MLP
      continue
    if wider.fits:
      advice.append(f"a model axis of {m} (--mesh_shape=data={p.mesh['data']},model={m}) fits "
                    f"in {wider.total_bytes / GIB:.2f} GiB per device")
      break
  if np.dtype(jnp.dtype(p.inputs.get("param_dtype", jnp.float32))).itemsize > 2:
    advice.append("bf16 weights and cache (--config.models.dtype=bf16) halve both")
  raise MemoryPlanError(
      f"the verifier's configuration needs {p.total_bytes / GIB:.2f} GiB per device but "
      f"{p.budget_bytes / GIB:.2f} GiB are available ({p.headroom:.0%} of "
      f"{p.device_bytes / GIB:.2f} GiB on {p.device_label or 'each device'}): "
      f"weights {p.weights_bytes / GIB:.2f} GiB, KV cache {p.kv_cache_bytes / GIB:.2f} GiB "
      f"({p.num_slots} slots), activations {p.activation_bytes / GIB:.2f} GiB. "
      + "; ".join(advice) + ".")
