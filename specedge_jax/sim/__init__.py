"""A capacity simulator: a discrete-event model of N edges and one verifier (issue 15).

  costs.py        what each piece of work costs: verify-cost curves t(B, tree tokens, context)
                  (a table measured on this CPU by `bench_core` or `calibrate.py`, a `bench_gpu`
                  grid, or a roofline for a named GPU and model shape), the decode step of
                  server-only serving, prefill, and the edge's draft/commit costs.
  acceptance.py   how many tree tokens a round accepts: measured acceptance by depth (or a
                  replay of real traces), and what a smaller or cut tree keeps of it.
  batching.py     the verifier's batching decisions: the static/dynamic rule of
                  `serving/engine_worker.py` mirrored (pinned by tests to the real worker), and
                  the 'slo' mode through the real `serving/slo_scheduler.py`.
  simulator.py    the event loop (heapq, simulated clock): edges with K interleaved requests,
                  simulated RTTs and draft costs, the verifier's engine thread, and server-only
                  autoregressive serving; its output is event dicts that `measure/metrics.py`
                  summarizes with the real figures' definitions.
  calibrate.py    measurements on this machine that feed the curves: the serving engines' own
                  verify/decode/prefill/draft/commit times, and the gRPC + TLS round overhead on
                  loopback (JAX and gRPC imported only there).
  experiments.py  what `launch/simulate.py` runs: `--validate` (predict the recorded sweep grid)
                  and `--scale` (10 to 1000 edges, CPU curves and a roofline), tables, JSON, PNG.

The simulator reuses the real decision code: `serving/slo_scheduler.py` (plan_batch,
start_time, AcceptanceStats), `serving/verify_time.py` (the estimator the 'slo' mode plans with)
and `serving/speculation_controller.py` (the edges' tree limits). It never runs a model, never
sleeps and never opens a socket (only `calibrate.py` does, to measure).
"""
