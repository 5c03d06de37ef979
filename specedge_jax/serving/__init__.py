"""The distributed serving stack: the gRPC verifier, the edge drafter client, the baselines.

Modules:
  specedge.proto / specedge_pb2*.py  the wire protocol (`specedge.v1`). The generated modules are
      committed; regenerate them with `python -m specedge_jax.serving.proto.codegen` (see codegen.py).
  verifier.py   the grpc.aio server that owns a `TargetEngine` on one engine thread and batches
      the trees of all sessions.
  drafter.py    the edge client: one `DraftEngine`, K interleaved requests, proactive drafting.
  baselines.py  server-only baselines (target-only autoregressive, server-side speculative).
  config.py     the frozen serving config read from `configs/*.py`.
  local.py      the one-machine cluster runner behind `launch/local.py`.
"""
