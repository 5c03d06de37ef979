"""The engines: host-side owners of the models, KV caches and per-session state.

  target.py        `TargetEngine`, the server's engine (prefill, batched verify, decode).
  draft.py         `DraftEngine`, the edge's engine (SpecExec growth, proactive drafting, commit).
  generate.py      the draft -> verify -> commit round and the in-process generation loop.
  prefix_cache.py  prompt prefill snapshots: export after an open, restore by copy.
  prefill.py       the chunked prompt prefill driver and batch buckets both engines use.
  clock.py         `DeviceClock`, the host-overhead accounting of device calls.

Both engines implement the contract in `specedge_jax.api`; serving reaches them only through it.
The jit boundary is in `specedge_jax.spec` (pure functions, donated caches); the engines own the
buffers, the padding to fixed shapes and the bookkeeping.
"""

from specedge_jax.api import (DraftTree, GREEDY, PROACTIVE_MODES, ProactiveParams, SamplingParams,
                              SlotsExhausted, TreeParams, VerifyResult)
from specedge_jax.engine.clock import DeviceClock
from specedge_jax.engine.draft import DraftEngine
from specedge_jax.engine.generate import GenerationOutput, Round, StepStats, generate, run_round
from specedge_jax.engine.prefix_cache import PrefillSnapshot
from specedge_jax.engine.target import TargetEngine

__all__ = [
    "DeviceClock", "DraftEngine", "DraftTree", "GREEDY", "GenerationOutput", "PROACTIVE_MODES",
    "PrefillSnapshot", "ProactiveParams", "Round", "SamplingParams",
    "SlotsExhausted", "StepStats", "TargetEngine", "TreeParams", "VerifyResult",
    "generate", "run_round",
]
