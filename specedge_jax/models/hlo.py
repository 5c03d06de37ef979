"""Reading compiled HLO for per-step weight copies.

A decoder step should read every weight once, straight from the buffer that holds it. Two things
break that, and both show up in the optimized HLO that `jax.jit(...).lower(...).compile()` gives:

- a `lax.scan` over stacked layers slices layer i out of each [L, ...] weight inside the loop
  body; XLA:CPU (and XLA:GPU unless its dynamic-slice fusion feeds the GEMM) materializes that
  slice as a fused `dynamic-slice` before the dot, i.e. one copy of every weight per step;
- a layout change of a weight (a `copy` or `transpose` to the shape a dot wants) does the same.

`collectives` lists the cross-device communication of a sharded program (models/sharding.py).

`weight_copies` finds both, by shape: an instruction that produces one layer's weight (the
[L, ...] leaf without its layer axis) from a larger operand, or copies/transposes a weight-shaped
array. It is a diagnostic with a test behind it (tests/models/test_hlo.py), not a general HLO
parser: it reads the text format's instruction lines, which is all it needs.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
from flax import nnx

from specedge_jax.models.model_config import ModelConfig

# `  %name = f32[4,256,768]{2,1,0} dynamic-slice(%a, %b), ...` (ROOT optional). Tuple-shaped
# results never are weights, so the pattern takes array shapes only.
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]"
    r"(?:\{[^}]*\})?\s+(?P<op>[\w\-]+)\((?P<operands>[^)]*)\)")
_OPERAND_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")
_SLICING_OPS = frozenset({"dynamic-slice", "slice", "gather"})
_COPYING_OPS = frozenset({"copy", "transpose"})
_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1,
          "pred": 1}


@dataclasses.dataclass(frozen=True)
class WeightCopy:
  """One instruction that materializes a weight-shaped array."""
  name: str
  op: str
  shape: tuple[int, ...]
  nbytes: int

  def __str__(self):
    return f"{self.op} %{self.name} {list(self.shape)} ({self.nbytes} B)"


def layer_weight_shapes(config: ModelConfig, min_elements: int = 1024) -> set[tuple[int, ...]]:
  """The shapes of one decoder layer's weights (matrices, not norm scales: those are too small
  to matter and too common a shape to tell apart from activations)."""
  from specedge_jax.models import transformer  # here: transformer imports nothing from us

  abstract = nnx.eval_shape(lambda: transformer.Transformer(config, rngs=nnx.Rngs(0)))
  _, stacked = nnx.split(abstract.layers)
  return {tuple(leaf.shape[1:]) for leaf in jax.tree.leaves(stacked)
          if int(np.prod(leaf.shape[1:])) >= min_elements}


def _dims(text: str) -> tuple[int, ...]:
  return tuple(int(d) for d in text.split(",") if d)


def weight_copies(hlo_text: str, weight_shapes: set[tuple[int, ...]]) -> list[WeightCopy]:
  """The instructions in optimized HLO text that copy a weight.

  Counted: a slicing op (dynamic-slice, slice, gather) whose result is a weight shape (with or
  without a leading 1) taken from a larger operand (a stacked [L, ...] weight), and a copy or
  transpose whose result is a weight shape (also transposed). Instructions inside fused
  computations are read too, since that is where the slice of a `dynamic-slice` fusion lives.
  """
  shapes = set(weight_shapes) | {tuple(reversed(s)) for s in weight_shapes}
  found = []
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match or match["op"] not in _SLICING_OPS | _COPYING_OPS:
      continue
    dims = _dims(match["dims"])
    squeezed = dims[1:] if dims[:1] == (1,) else dims
    if squeezed not in shapes:
      continue
    if match["op"] in _SLICING_OPS:
      operand = _OPERAND_SHAPE.search(match["operands"])
      # Without inline operand shapes (older text formats) a slice to a weight shape is taken
      # to be one.
      if operand is not None and np.prod(_dims(operand[1])) <= np.prod(dims):
        continue
    nbytes = int(np.prod(dims)) * _BYTES.get(match["dtype"], 4)
    found.append(WeightCopy(match["name"], match["op"], dims, nbytes))
  return found


_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(?P<shape>\(?[a-z]+\d*\[[\d,]*\][^ ]*)\s+"
    r"(?P<op>all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(")


def collectives(hlo_text: str) -> list[tuple[str, str]]:
  """(op, result shape) of every cross-device collective in compiled HLO text: what a sharded
  program sends between devices per call."""
  found = []
  for line in hlo_text.splitlines():
    match = _COLLECTIVE.match(line)
    if match:
      found.append((match["op"], re.sub(r"\{[^}]*\}", "", match["shape"])))
  return found


def compiled_text(jitted, *args, **kwargs) -> str:
  """The optimized HLO of a jitted function for these arguments (compiles, runs nothing)."""
  return jitted.lower(*args, **kwargs).compile().as_text()
