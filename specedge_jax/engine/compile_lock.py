"""Processes that compile the same programs take turns, so that all but the first load them from
JAX's persistent compilation cache.

The drafters of a local run start together and warm up the same draft programs. The cache is
written as each program finishes compiling, but processes that start together all miss it and
compile every program each: on a 2-core CPU two drafters spent ~6 s of CPU apiece on identical
compiles, CPU the verifier (compiling its own programs meanwhile) waited for. `exclusive` holds
a file lock in the cache folder around such a warm-up: the first process compiles, the next
ones then find every program in the cache. The lock is `fcntl.flock`, which the OS releases
when its holder exits, however it exits. Without a persistent cache there is nothing to share,
and no lock is taken.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator

import jax

_log = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive(name: str, timeout_s: float = 600.0, poll_s: float = 0.05,
              folder: str | None = None) -> Iterator[float]:
  """Holds the lock `name` (e.g. "draft-warmup") of `folder` (default: JAX's persistent cache
  folder) for the block; yields the seconds waited for it. After `timeout_s` of waiting (a
  holder that hangs) the block runs anyway."""
  folder = folder if folder is not None else jax.config.jax_compilation_cache_dir
  if not folder:
    yield 0.0
    return
  os.makedirs(folder, exist_ok=True)
  start = time.monotonic()
  with open(os.path.join(folder, f".specedge-{name}.lock"), "a") as lock:
    locked = False
    while not locked:
      try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locked = True
      except BlockingIOError:
        if time.monotonic() - start > timeout_s:
          _log.warning("lock %s still held after %.0f s: going on without it", name, timeout_s)
          break
        time.sleep(poll_s)
    try:
      yield time.monotonic() - start
    finally:
      if locked:
        fcntl.flock(lock, fcntl.LOCK_UN)
