"""`DeviceClock`: optional accounting of the time an engine spends in device calls.

It exists for the host-overhead benchmark (`bench/core.py`): enabled, it blocks on each call's
outputs, so everything else a step spends is host overhead. Disabled (the default) it only
forwards the call, so serving keeps JAX's asynchronous dispatch.
"""

from __future__ import annotations

import time

import jax


class DeviceClock:
  """Optional accounting of time spent in device calls, for the host-overhead benchmark.

  Disabled (the default), it only forwards the call, so serving keeps JAX's asynchronous
  dispatch. Enabled, it blocks on each call's outputs and adds the dispatch-to-completion time
  to `seconds`; everything else a step spends is host overhead.
  """

  def __init__(self):
    self.enabled = False
    self.seconds = 0.0

  def __call__(self, fn, *args, **kwargs):
    if not self.enabled:
      return fn(*args, **kwargs)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    jax.block_until_ready(out)
    self.seconds += time.perf_counter() - start
    return out
