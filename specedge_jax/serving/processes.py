"""Process plumbing for the one-machine cluster: child processes and their clean shutdown.

Child side: `pin_to_cpus` (core affinity, set before XLA sizes its thread pools) and
`exit_with_parent` (a watchdog thread that ends the process when the launching process is gone,
so a `kill -9` of the launcher leaves no orphans either).

Parent side: `ChildProcesses` starts each child in its own session (own process group, so the
terminal's Ctrl-C reaches only the parent, which then shuts the children down in order) and
kills every group it started on exit, on SIGTERM, and from `atexit`. It signals only the groups
it created, never processes by name. `log_tail` reads the end of a child's log for the error
message when a child fails.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Sequence


def pin_to_cpus(cpus: Sequence[int]) -> None:
  """Restricts this process (and the threads it starts later) to the given cores."""
  wanted = set(int(c) for c in cpus)
  available = os.sched_getaffinity(0)
  if not wanted <= available:
    raise ValueError(f"cpus {sorted(wanted)} are not all available (have {sorted(available)})")
  os.sched_setaffinity(0, wanted)


def exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> threading.Thread:
  """Starts a daemon thread that SIGTERMs this process once `parent_pid` no longer exists."""

  def watch():
    while True:
      try:
        os.kill(parent_pid, 0)
      except ProcessLookupError:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        os._exit(1)  # pylint: disable=protected-access (SIGTERM was ignored or too slow)
      except PermissionError:  # the pid exists (reused by another user's process: stay put)
        pass
      time.sleep(poll_s)

  thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
  thread.start()
  return thread


def parse_cpus(text: str) -> tuple[int, ...]:
  """'0', '1-3', '0,2-3' -> cores; '' -> ()."""
  cpus: list[int] = []
  for part in filter(None, (p.strip() for p in text.split(","))):
    first, _, last = part.partition("-")
    try:
      low, high = int(first), int(last or first)
    except ValueError:
      raise ValueError(f"bad cpu list {text!r}: expected e.g. '0', '1-3' or '0,2'") from None
    if low < 0 or high < low:
      raise ValueError(f"bad cpu range {part!r} in {text!r}")
    cpus.extend(range(low, high + 1))
  return tuple(cpus)


class ChildProcesses:
  """Children started in their own process groups and always cleaned up."""

  def __init__(self):
    self.children: dict[str, subprocess.Popen] = {}
    self._logs = []
    atexit.register(self.kill_all)

  def start(self, name: str, argv: Sequence[str], log_path: str,
            env: dict[str, str] | None = None) -> subprocess.Popen:
    if name in self.children:
      raise ValueError(f"a child named {name!r} already runs")
    log = open(log_path, "w")
    self._logs.append(log)
    child = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True,
                             env={**os.environ, **(env or {})})
    self.children[name] = child
    return child

  def failed(self) -> dict[str, int]:
    """Children that exited with a non-zero status."""
    return {name: child.returncode for name, child in self.children.items()
            if child.poll() is not None and child.returncode != 0}

  def stop(self, name: str, timeout_s: float = 30.0) -> int | None:
    """SIGTERM to the child's group, then SIGKILL after timeout_s. Returns its exit status."""
    child = self.children[name]
    if child.poll() is None:
      self._signal_group(child, signal.SIGTERM)
      try:
        child.wait(timeout_s)
      except subprocess.TimeoutExpired:
        self._signal_group(child, signal.SIGKILL)
        child.wait()
    return child.returncode

  def kill_all(self, timeout_s: float = 10.0) -> None:
    alive = [c for c in self.children.values() if c.poll() is None]
    for child in alive:
      self._signal_group(child, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in alive:
      try:
        child.wait(max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        self._signal_group(child, signal.SIGKILL)
        child.wait()
    for log in self._logs:
      log.close()
    self._logs.clear()

  @staticmethod
  def _signal_group(child: subprocess.Popen, sig: int) -> None:
    try:
      os.killpg(child.pid, sig)  # the child leads its own group (start_new_session)
    except ProcessLookupError:
      pass


def python_module_argv(module: str, *flags: str) -> list[str]:
  return [sys.executable, "-m", module, *flags]


def log_tail(path: str, lines: int = 30) -> str:
  """The last `lines` lines of a child's log, for an error message; "(no log)" if unreadable."""
  try:
    with open(path) as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return "(no log)"
