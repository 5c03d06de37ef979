"""Type-checked only (by mypy, in tests/test_contract.py), never run: every engine, real or fake,
is assignable to the contract it claims."""

from specedge_jax import api
from specedge_jax.engine import DraftEngine, TargetEngine
from specedge_jax.testing import fakes


def real_engines_fit(target: TargetEngine, draft: DraftEngine) -> None:
  as_target: api.TargetEngineProtocol = target
  as_draft: api.DraftEngineProtocol = draft
  del as_target, as_draft


def fake_engines_fit() -> None:
  as_target: api.TargetEngineProtocol = fakes.FakeTargetEngine()
  as_draft: api.DraftEngineProtocol = fakes.FakeDraftEngine()
  del as_target, as_draft
