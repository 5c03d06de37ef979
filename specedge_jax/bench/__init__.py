"""Benchmark logic behind the `launch/bench_*.py` and `launch/sweep.py` launchers.

  core.py            verify curve, host overhead and in-process generation.
  backends.py        XLA vs PyTorch (eager, compile) forward throughput, single GEMMs.
  peers.py           our whole loop vs the PyTorch SpecExec and HF assisted generation.
  torch_specexec.py  a plain PyTorch SpecExec reference (torch is imported lazily: an extra).
  convert.py         conversion peak memory.
  sweep.py           SpecEdge and the server-only baselines over a grid, with report and plots.
  bf16_agreement.py  greedy agreement in bf16: speculative vs target-only, bf16 vs fp32.
  gpu.py             the verifier at the paper's scale on one GPU: verify curve, MBU, HLO
                     weight copies, replayed SpecEdge vs server-only throughput.

The library never imports this package. Benchmarks print tables and write JSON and plots; they
are not timed tests.
"""
