"""Benchmark logic behind the `launch/bench_*.py` and `launch/sweep.py` launchers.

  core.py            verify curve, host overhead and in-process generation.
  backends.py        XLA vs PyTorch (eager, compile) forward throughput, single GEMMs.
  peers.py           our whole loop vs the PyTorch SpecExec and HF assisted generation.
  torch_specexec.py  a plain PyTorch SpecExec reference (torch is imported lazily: an extra).
  convert.py         conversion peak memory.
  sweep.py           SpecEdge and the server-only baselines over a grid, with report and plots.

The library never imports this package. Benchmarks print tables and write JSON and plots; they
are not timed tests.
"""
