"""Moves the verifier's network threads off the cores that run the model.

A verifier pinned to one core (`--cpus=0`) runs everything there: XLA's compute, and also gRPC's
event-engine threads (TLS, HTTP/2 framing) and the asyncio loop that decodes protobufs and runs
the handlers. Under load these take turns with the forward on that core, so a verify forward
measured in the serving process stretched by up to 50 % over the same (B, T) on a quiet core
(WORKSPACE_NOTES.md, "Goodput after the controller and scheduler fixes"). A GPU server has host
cores to spare for its network threads; `IoThreadPlacer` gives the verifier the same split on a
CPU box: the process starts on its compute cores (so XLA sizes its pools to them), and once it
serves, its network threads move to `io_cpus`.

Which threads are network threads. Affinity is per thread on Linux, and a new thread inherits its
creator's. Moved to `io_cpus`:
  - the main thread: the asyncio loop of grpc.aio (protobuf decoding, the servicer's handlers),
    and every thread it starts from then on (asyncio's executor, the metrics HTTP server);
  - gRPC core's threads, known by the names it gives them (`GRPC_THREAD_PREFIXES`:
    `event_engine`, `grpc_global_tim`, `lifeguard`, ...).
Everything else stays on the compute cores: XLA's threads (its intra-op pool `tf_XLAEigen`, its
LLVM compile workers, its unnamed runtime threads), and Python's own (3.11 does not name them;
the engine worker's thread, started before the move, keeps the compute cores). A list of names
rather than "whatever is not XLA's", because a thread's name is fixed when it starts: threads
started before absl renames the process carry the interpreter's name, and nothing tells an
early XLA thread from a Python one by name. gRPC grows its pool on demand, so `IoThreadPlacer`
looks again every `poll_s`; a scan reads /proc/self/task (tens of entries).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence

_log = logging.getLogger(__name__)

# The names gRPC core gives its threads (a Linux thread name holds 15 characters):
# `event_engine` (the EventEngine pool: TLS, HTTP/2 framing, socket reads), `grpc_global_tim`
# (its timer), `lifeguard` (the pool's supervisor), `default-executo`, `resolver-execu`.
GRPC_THREAD_PREFIXES = ("event_engine", "grpc", "lifeguard", "default-executo", "resolver")


def thread_names() -> dict[int, str]:
  """{thread id: comm} of this process's live threads (Linux /proc)."""
  names = {}
  for entry in os.listdir("/proc/self/task"):
    try:
      with open(f"/proc/self/task/{entry}/comm") as f:
        names[int(entry)] = f.read().strip()
    except OSError:  # the thread ended between the listing and the read
      continue
  return names


def io_thread_ids(names: Mapping[int, str], main_thread_id: int) -> set[int]:
  """The threads to move (module docstring): the main thread and gRPC's."""
  moved = {main_thread_id} if main_thread_id in names else set()
  moved.update(tid for tid, name in names.items() if name.startswith(GRPC_THREAD_PREFIXES))
  return moved


def check_io_cpus(io_cpus: Sequence[int]) -> set[int]:
  """`io_cpus` as a set, or ValueError naming what is wrong with it."""
  if not hasattr(os, "sched_setaffinity"):
    raise ValueError("moving threads to io_cpus needs per-thread core affinity (Linux)")
  wanted = {int(c) for c in io_cpus}
  # The cores this process may use were narrowed to the compute cores by --cpus, and
  # sched_getaffinity reports only those; the machine's cores bound io_cpus instead.
  online = set(range(os.cpu_count() or 1))
  if not wanted or not wanted <= online:
    raise ValueError(f"io_cpus {sorted(wanted)} must be a non-empty subset of this machine's "
                     f"cores {sorted(online)}")
  return wanted


class IoThreadPlacer:
  """Keeps the network threads of this process on `io_cpus` (module docstring): `place()` once
  the server serves, then `start()` repeats it every `poll_s` for threads created later; `stop()`
  ends the repeats."""

  def __init__(self, io_cpus: Sequence[int], poll_s: float = 1.0):
    self.io_cpus = check_io_cpus(io_cpus)
    self._poll_s = poll_s
    main_id = threading.main_thread().native_id
    if main_id is None:  # only before the main thread runs, never in a serving process
      raise ValueError("the main thread has no native id yet")
    self._main_id: int = main_id
    self._placed: dict[int, str] = {}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  @property
  def placed(self) -> dict[int, str]:
    """Every thread moved so far (tid -> name), live or not."""
    return dict(self._placed)

  def place(self) -> dict[int, str]:
    """Moves the network threads there now; returns those it moved (tid -> name)."""
    names = thread_names()
    moved = {}
    for tid in io_thread_ids(names, self._main_id):
      try:  # set again on every scan: cheap, and a reused thread id gets the right cores
        os.sched_setaffinity(tid, self.io_cpus)
      except (ProcessLookupError, OSError):  # ended since the scan; nothing to place
        continue
      moved[tid] = names[tid]
    new = {tid: name for tid, name in moved.items() if self._placed.get(tid) != name}
    self._placed.update(moved)
    if new:
      _log.info("moved %d network thread(s) to cores %s: %s", len(new), sorted(self.io_cpus),
                ", ".join(sorted(set(new.values()))))
    return moved

  def start(self) -> "IoThreadPlacer":
    self.place()
    self._thread = threading.Thread(target=self._watch, name="io-placer", daemon=True)
    self._thread.start()
    return self

  def _watch(self) -> None:
    # Started by the main thread after its move, this thread runs on io_cpus itself.
    while not self._stop.wait(self._poll_s):
      self.place()

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(5.0)
