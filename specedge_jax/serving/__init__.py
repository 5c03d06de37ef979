"""The distributed serving stack: the gRPC verifier, the edge drafter, the baselines.

  proto/            the wire protocol (`specedge.v1`) and its committed generated code.
  verifier.py       the grpc.aio server: lifecycle and health, wiring the next three.
  servicer.py       the Verifier handlers: sessions, validation of every field, gRPC statuses
                    (loads no JAX).
  engine_worker.py  the engine thread: sole caller of the target engine, the batching policy,
                    the prefill snapshot LRU.
  owner_thread.py   how a result computed on an owner thread reaches the event loop.
  io_threads.py     the verifier's network threads (gRPC's, its event loop) moved off the cores
                    XLA computes on (`launch.verifier --io_cpus`).
  drafter.py        the edge client: one draft engine, K interleaved requests, proactive drafting.
  baselines.py      server-only baselines (target-only autoregressive, server-side SpecExec).
  serving_config.py the frozen serving config read from `configs/*.py`.
  workload.py       the requests of a run (embedded prompts or a benchmark set).
  runners.py        builds engines from a config and runs a verifier, a drafter or a baseline.
  processes.py      child-process plumbing; local.py the one-machine cluster behind launch/local.
  netns.py          edges as real hosts on one machine: network namespaces over shaped links
                    (tc netem, or link_shaper.py's userspace TUN relay where netem is missing).

Serving reaches engines only through `specedge_jax.api`: runners.py, which builds them, is the
one module that names the JAX engines; baselines.py reuses the in-process round
(`engine.generation.run_round`), which is written against the contract and loads no JAX.
"""
