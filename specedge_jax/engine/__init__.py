"""The engines: host-side owners of the models, KV caches and per-session state.

  target.py        `TargetEngine`, the server's engine (prefill, batched verify, decode).
  draft.py         `DraftEngine`, the edge's engine (SpecExec growth, proactive drafting, commit).
  generation.py    the draft -> verify -> commit round and the in-process generation loop.
  prefix_cache.py  prompt prefill snapshots: export after an open, restore by copy.
  prefill.py       the chunked prompt prefill driver and batch buckets both engines use.
  clock.py         `DeviceClock`, the host-overhead accounting of device calls.
  compile_lock.py  processes that compile the same programs take turns (persistent cache).

Both engines implement the contract in `specedge_jax.api`; serving reaches them only through it.
The jit boundary is in `specedge_jax.spec` (pure functions, donated caches); the engines own the
buffers, the padding to fixed shapes and the bookkeeping.
"""

import importlib

# Names are resolved on first use (PEP 562), so that importing one JAX-free module of this package
# (`generation.py`, which serving's baselines reuse) does not load JAX through the engines.
_EXPORTS = {
    "DraftTree": "specedge_jax.api", "GREEDY": "specedge_jax.api",
    "PROACTIVE_MODES": "specedge_jax.api", "ProactiveParams": "specedge_jax.api",
    "SamplingParams": "specedge_jax.api", "SlotsExhausted": "specedge_jax.api",
    "TreeParams": "specedge_jax.api", "VerifyResult": "specedge_jax.api",
    "DeviceClock": "specedge_jax.engine.clock",
    "DraftEngine": "specedge_jax.engine.draft",
    "GenerationOutput": "specedge_jax.engine.generation", "Round": "specedge_jax.engine.generation",
    "StepStats": "specedge_jax.engine.generation", "generate": "specedge_jax.engine.generation",
    "run_round": "specedge_jax.engine.generation",
    "PrefillSnapshot": "specedge_jax.engine.prefix_cache",
    "TargetEngine": "specedge_jax.engine.target",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
  return __all__
