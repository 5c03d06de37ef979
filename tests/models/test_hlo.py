"""No per-layer weight copy in the compiled verify, decode and prefill (issue 13).

The detector (`models/hlo.py`) is checked on both sides: the stacked `lax.scan` state must show
one copy per layer matrix (XLA:CPU materializes each layer's slice before its dot), so a
detector that found nothing would fail here; the engines' layerwise state must show none.
"""

import jax
import numpy as np
import pytest

from specedge_jax import api
from specedge_jax.engine.target import TargetEngine
from specedge_jax.models import hlo
from specedge_jax.models.transformer import split_model
from specedge_jax.spec import prefill as spec_prefill
from specedge_jax.spec import verify as verify_lib
from specedge_jax.testing import tiny_models

BATCH, NODES = 2, 8


def verify_args(engine, state, capacity):
  zeros = np.zeros(BATCH, np.int32)
  return (engine.graphdef, state, engine.cache, zeros, zeros,
          np.zeros((BATCH, capacity), np.int32), np.full((BATCH, capacity), -1, np.int32), zeros,
          np.zeros(BATCH, np.float32), np.ones(BATCH, np.float32), zeros,
          np.zeros(BATCH, np.uint32), zeros)


@pytest.fixture(scope="module")
def engine_and_states():
  target, _ = tiny_models.make_pair(64, num_layers=3)
  _, stacked = split_model(target)
  engine = TargetEngine(target, num_slots=2, max_len=64, max_tree_nodes=NODES,
                        max_batch_size=BATCH)
  return engine, stacked, hlo.layer_weight_shapes(engine.config, min_elements=512)


@pytest.mark.parametrize("capacity", [NODES, 1], ids=["verify", "decode"])
def test_stacked_scan_copies_every_layer_matrix_and_layerwise_copies_none(engine_and_states,
                                                                          capacity):
  engine, stacked, shapes = engine_and_states
  scan_copies = hlo.weight_copies(
      hlo.compiled_text(verify_lib.verify, *verify_args(engine, stacked, capacity)), shapes)
  # q, k, v, o, gate, up, down: seven matrices sliced per step of the layer loop.
  assert len(scan_copies) == 7, [str(c) for c in scan_copies]
  layerwise = hlo.weight_copies(
      hlo.compiled_text(verify_lib.verify, *verify_args(engine, engine.state, capacity)), shapes)
  assert layerwise == [], [str(c) for c in layerwise]


def test_prefill_copies_no_weight(engine_and_states):
  engine, _, shapes = engine_and_states
  text = hlo.compiled_text(spec_prefill.prefill_chunk, engine.graphdef, engine.state,
                           engine.cache, np.int32(0), np.zeros(8, np.int32), np.int32(0),
                           np.int32(1))
  assert hlo.weight_copies(text, shapes) == []


def test_layerwise_engine_decodes_like_the_stacked_model(engine_and_states):
  engine, _, _ = engine_and_states
  slot, first, _ = engine.open([3, 4, 5], api.GREEDY, 0, 6)
  tokens = [first] + [t for _ in range(4) for t in engine.decode([slot])[0].emitted]
  engine.close(slot)
  target, _ = tiny_models.make_pair(64, num_layers=3)
  reference = TargetEngine(target, num_slots=1, max_len=64, max_tree_nodes=NODES,
                           max_batch_size=BATCH)
  # The reference runs the scan: same weights, other program; greedy tokens must agree.
  reference.graphdef, reference.state = split_model(target)
  slot, first, _ = reference.open([3, 4, 5], api.GREEDY, 0, 6)
  expected = [first] + [t for _ in range(4) for t in reference.decode([slot])[0].emitted]
  assert tokens == expected


def test_detector_reads_transposes_and_slices_by_shape():
  text = "\n".join([
      "  %a = f32[3,32,64]{2,1,0} parameter(0)",
      "  %s = f32[1,32,64]{2,1,0} dynamic-slice(%a, %i, %z, %z), dynamic_slice_sizes={1,32,64}",
      "  %t = f32[64,32]{1,0} transpose(%w), dimensions={1,0}",
      "  %c = f32[8,64]{1,0} copy(%x)",  # an activation: not a weight shape
      "  ROOT %f = f32[32,64]{1,0} fusion(%a), kind=kLoop",  # fusions are read inside
  ])
  found = hlo.weight_copies(text, {(32, 64)})
  assert [(c.op, c.shape) for c in found] == [("dynamic-slice", (1, 32, 64)),
                                               ("transpose", (64, 32))]
  assert found[0].nbytes == 32 * 64 * 4


def test_consuming_split_frees_the_stacked_weights_and_keeps_the_values():
  target, _ = tiny_models.make_pair(64, num_layers=3)
  _, expected = split_model(target, layerwise=True)
  stacked = jax.tree.leaves(split_model(target)[1])
  _, state = split_model(target, layerwise=True, consume=True)
  assert all(leaf.is_deleted() for leaf in stacked if leaf.ndim >= 2 and leaf.shape[0] == 3)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
