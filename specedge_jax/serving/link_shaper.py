"""A userspace stand-in for `tc netem`: point-to-point links made of TUN pairs, with delay,
jitter and loss, for kernels built without sch_netem.

What this module owns: creating the two TUN devices of each link (`open_tun`), the per-packet
schedule of one direction of a link (`Direction`: drop with the loss probability, else due
after the delay plus uniform jitter, never before the packet ahead of it), and the relay loop
that carries packets from one TUN of a link to the other when they are due (`relay`). It runs
as its own process (`python link_shaper.py SPEC_JSON`, started by `netns.NetnsTopology`): it
creates the devices in the namespace it was started in, prints one line `ready`, and relays
until its stdin closes (its parent went away, even by `kill -9`) or SIGTERM. The TUN devices are
not persistent, so they disappear with this process wherever they were moved.

What it never touches: namespaces, addresses and routes. `netns.py` moves each device into its
namespace and configures it once this process says `ready`; the file descriptors stay valid
across the move.

Threads: one. select(2) waits on every TUN and on stdin with a timeout up to the next due
packet (microsecond resolution; epoll's is a millisecond); due packets are written before
anything new is read. A packet leaves a little late (its wake-up, ~0.1-0.5 ms; it runs at nice
-10 where allowed, so the model processes on the same cores delay it little), never early.
Packets of one direction keep their order (none is due before the one ahead of it), so jitter
never reorders, where netem does. Loss drops a packet outright, as netem does; TCP resends it.

Imports only the standard library, and is run by file path: it starts in ~50 ms, without the
package's imports.
"""

from __future__ import annotations

import dataclasses
import fcntl
import heapq
import itertools
import json
import os
import random
import selectors
import struct
import sys
import time
from collections.abc import Mapping

# linux/if_tun.h
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000  # raw IP packets, no 4-byte protocol header
_IFF_TUN_EXCL = 0x8000  # fail rather than attach to a device of that name that exists
_MAX_PACKET = 65536


def open_tun(name: str) -> int:
  """Creates the TUN device `name` in this process's network namespace; returns its
  non-blocking file descriptor (the device lives as long as it is open)."""
  fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
  try:
    fcntl.ioctl(fd, _TUNSETIFF,
                struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI | _IFF_TUN_EXCL))
  except OSError:
    os.close(fd)
    raise
  return fd


@dataclasses.dataclass
class Direction:
  """One direction of a link: where its packets go and when."""
  out_fd: int
  delay_s: float
  jitter_s: float = 0.0
  loss: float = 0.0  # probability in [0, 1)
  _last_due: float = 0.0

  def schedule(self, now: float, rng: random.Random) -> float | None:
    """When a packet that arrived at `now` leaves; None: it is lost."""
    if self.loss and rng.random() < self.loss:
      return None
    delay = self.delay_s + (rng.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0.0)
    # Never ahead of the packet before it: a link does not reorder (TCP would see it as loss).
    due = max(now + max(delay, 0.0), self._last_due)
    self._last_due = due
    return due


def relay(directions: Mapping[int, Direction], stop_fd: int, rng: random.Random) -> None:
  """Carries packets read from each fd of `directions` to its `out_fd` when due, until
  `stop_fd` reaches end of file."""
  # select(2), not epoll: its timeout has microseconds, epoll's milliseconds (rounded up, so
  # ~0.5 ms late per direction on average). A link has two fds; the fd limit is no concern.
  selector = selectors.SelectSelector()
  for fd in directions:
    selector.register(fd, selectors.EVENT_READ)
  selector.register(stop_fd, selectors.EVENT_READ)
  due_packets: list[tuple[float, int, int, bytes]] = []  # (due, arrival order, out fd, packet)
  order = itertools.count()
  while True:
    now = time.monotonic()
    while due_packets and due_packets[0][0] <= now:
      _, _, out_fd, packet = heapq.heappop(due_packets)
      try:
        os.write(out_fd, packet)
      except OSError:
        pass  # the receiving side's queue is full or its device is going: lost, as on a link
    timeout = max(due_packets[0][0] - now, 0.0) if due_packets else None
    for key, _ in selector.select(timeout):
      if key.fd == stop_fd:
        if not os.read(stop_fd, 4096):
          return
        continue
      direction = directions[key.fd]
      while True:
        try:
          packet = os.read(key.fd, _MAX_PACKET)
        except BlockingIOError:
          break
        due = direction.schedule(time.monotonic(), rng)
        if due is not None:
          heapq.heappush(due_packets, (due, next(order), direction.out_fd, packet))


def main(argv: list[str]) -> int:
  """argv[1]: {"links": [{"server_tun", "drafter_tun", "delay_ms", "jitter_ms", "loss_pct"}],
  "seed": int or null}. Each link's delay, jitter and loss apply to each of its directions."""
  spec = json.loads(argv[1])
  rng = random.Random(spec.get("seed"))
  directions: dict[int, Direction] = {}
  for link in spec["links"]:
    fds = []
    for name in (link["server_tun"], link["drafter_tun"]):
      try:
        fds.append(open_tun(name))
      except OSError as e:  # the parent shows stderr: one line, not a traceback
        print(f"cannot create TUN device {name}: {e.strerror or e}", file=sys.stderr)
        return 2
    server_fd, drafter_fd = fds
    delay_s, jitter_s = link["delay_ms"] / 1000.0, link.get("jitter_ms", 0.0) / 1000.0
    loss = link.get("loss_pct", 0.0) / 100.0
    directions[server_fd] = Direction(drafter_fd, delay_s, jitter_s, loss)  # server -> drafter
    directions[drafter_fd] = Direction(server_fd, delay_s, jitter_s, loss)  # drafter -> server
  try:
    # Ahead of the model processes it shares the cores with, as netem (in softirq) would be: a
    # link's delay must not grow with their load. Best effort (needs CAP_SYS_NICE).
    os.setpriority(os.PRIO_PROCESS, 0, -10)
  except OSError:
    pass
  print("ready", flush=True)
  relay(directions, sys.stdin.fileno(), rng)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
