"""The engine contract (`specedge_jax.api`): what holds serving to it.

* The contract, the gRPC servicer, the fakes and the in-process round (shared with the
  server-only baselines) load no JAX (a fresh interpreter).
* mypy type-checks api.py, serving/ and testing/, and that every engine fits its Protocol.
* At run time, real and fake engines are instances of the (runtime-checkable) Protocols.
"""

import os
import subprocess
import sys

import pytest

from specedge_jax import api
from specedge_jax import engine as E
from specedge_jax.testing import fakes, tiny_models

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HEAVY = ("jax", "jaxlib", "flax", "optax", "orbax", "torch")


def test_contract_and_servicer_load_no_jax():
  code = ("import sys\n"
          "import specedge_jax.api, specedge_jax.serving.servicer, specedge_jax.testing.fakes\n"
          "import specedge_jax.serving.baselines, specedge_jax.engine.generation\n"
          f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {_HEAVY!r})\n"
          "print(','.join(heavy))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO_ROOT, check=True)
  assert out.stdout.strip() == "", f"loaded: {out.stdout.strip()}"


@pytest.mark.slow
@pytest.mark.heavy  # ~50 s: mypy, a development check rather than behaviour
def test_type_check_of_contract_serving_and_testing():
  out = subprocess.run(
      [sys.executable, "-m", "mypy", "--no-incremental", "specedge_jax/api.py",
       "specedge_jax/serving", "specedge_jax/testing", "tests/contract_typecheck.py"],
      capture_output=True, text=True, cwd=REPO_ROOT)
  assert out.returncode == 0, out.stdout + out.stderr


def test_engines_are_instances_of_the_protocols():
  assert isinstance(fakes.FakeTargetEngine(), api.TargetEngineProtocol)
  assert isinstance(fakes.FakeDraftEngine(), api.DraftEngineProtocol)
  target, draft = tiny_models.make_pair(vocab_size=32)
  target_engine = E.TargetEngine(target, num_slots=2, max_len=64, max_tree_nodes=8,
                                 max_batch_size=2)
  draft_engine = E.DraftEngine(draft, num_slots=2, max_len=32, tree=E.TreeParams(2, 2, 2, 4))
  assert isinstance(target_engine, api.TargetEngineProtocol)
  assert isinstance(draft_engine, api.DraftEngineProtocol)
  assert not isinstance(draft_engine, api.TargetEngineProtocol)  # the check can fail


def test_cache_room_and_tree_validation_name_the_problem():
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    api.check_cache_room(4, 0, max_tree_nodes=8, max_len=64)
  with pytest.raises(ValueError, match=r"needs 73 cache rows; this server has max_len 64"):
    api.check_cache_room(5, 60, max_tree_nodes=8, max_len=64)
  api.check_cache_room(5, 51, max_tree_nodes=8, max_len=64)  # exactly full fits
  with pytest.raises(ValueError, match="siblings"):
    api.validate_tree([1, 2, 2], [-1, 0, 0], max_nodes=8, vocab_size=10)
  api.validate_tree([1, 2, 2], [-1, 0, 1], max_nodes=8, vocab_size=10)  # a chain may repeat
