"""Edges as real hosts on one machine: the verifier and each drafter in a Linux network namespace
of its own, joined by point-to-point links that delay, jitter and drop packets.

What this module owns: the topology (`NetnsTopology`, a context manager that builds it and tears
it down, on exceptions too), its addresses, the argv prefix that runs a command inside one of its
namespaces (`exec_prefix`), whether this machine can build it (`check_supported`, found by trying,
not by guessing), and the removal of what crashed runs left behind (`cleanup_stale`). Everything
goes through iproute2 (`ip`, `tc`) in subprocesses. What it never touches: the processes that run
inside the namespaces (`local.py` starts them with `exec_prefix`), and the root namespace's
interfaces, addresses and routes, which it leaves as it found them (a TUN device is made there
and moved out at once: a device is created in its maker's namespace).

Shape: a star, one link per drafter, rather than veth pairs into a bridge. Each drafter's link
is its own, so a per-drafter RTT (`NetnsConfig.drafter_rtts_ms`) is simply that link's delay on
both of its ends; the same star works for the TUN links below, which carry IP packets and cannot
join a bridge; and no bridge means no br_netfilter on the path. The verifier has one address,
`<subnet>.1`, put on every server-side end as a point-to-point address (`ip addr add A peer B`),
so it listens on one address that its TLS certificate names; drafter i is `<subnet>.(i+2)`. These
addresses exist only inside the run's namespaces, so parallel runs may use the same subnet;
names carry the owner's pid and a random tag (`sej-<pid>-<tag>-server`, `...-edge<i>`) so they
never collide, and `cleanup_stale` knows whose owner is gone.

Shapers (`NetnsConfig.shaper`):
  netem  a veth pair per link and `tc qdisc add dev ... root netem delay <rtt/2>ms <jitter>ms
         loss <p>%` on both ends, so a round trip is the RTT. The kernel's own emulator.
  tun    for kernels built without sch_netem (CONFIG_NET_SCH_NETEM unset; no module to load):
         two TUN devices per link, one in each namespace, relayed by a userspace process
         (`link_shaper.py`) that applies the same delay, jitter and loss to each direction.
         A packet leaves a little late (its wake-up, ~0.1-0.5 ms), never early, and in order.
  auto   netem where the kernel has it, else tun.
Jitter and loss apply to each direction, as netem on both ends does: a round trip sees jitter
from both, and about twice the loss.

The one-machine cluster (`local.py`, `launch.local --netns`) puts the verifier and each drafter
into their namespaces; it never talks to them over the network itself (it reads their port and
event files), so the root namespace needs no link into the topology.

Processes: the topology is built and torn down in the caller's thread, by `ip`/`tc` commands run
one after another. The tun shaper is one child process in its own session, tied to its owner by
a pipe on its stdin: `close()` closes the pipe and the shaper exits; if the owner dies, even by
`kill -9`, the pipe closes all the same, and only the namespaces remain, for `cleanup_stale`.
"""

from __future__ import annotations

import atexit
import dataclasses
import ipaddress
import json
import logging
import os
import re
import secrets
import selectors
import shutil
import subprocess
import sys
from collections.abc import Sequence

from specedge_jax.serving import link_shaper

_log = logging.getLogger(__name__)

PREFIX = "sej-"  # every namespace this module makes is named sej-<owner pid>-<tag>-<role>
SHAPERS = ("auto", "netem", "tun")
SERVER_PORT = 50051  # the verifier's namespace is new and its own: any fixed port is free there
SERVER_LINK_NAME = "edge{index}"  # the server-side end of drafter i's link (server namespace)
DRAFTER_LINK_NAME = "uplink"  # the drafter-side end (its namespace)
_NAME = re.compile(rf"^{re.escape(PREFIX)}(\d+)-([0-9a-f]+)-")
_CAP_NET_ADMIN = 12  # linux/capability.h
_COMMAND_TIMEOUT_S = 30.0
_SHAPER_READY_S = 15.0
_UNSUPPORTED = "network namespaces with shaped links are not possible here: "


class NetnsError(RuntimeError):
  """The topology cannot be built here (the message says why), or a command building it
  failed."""


@dataclasses.dataclass(frozen=True)
class NetnsConfig:
  """What the links do to packets. Delays are the round trip (half on each end of a link);
  jitter (uniform, +-) and loss apply to each direction."""

  rtt_ms: float = 14.0
  jitter_ms: float = 1.0
  loss_pct: float = 0.1
  drafter_rtts_ms: tuple[float, ...] = ()  # one per drafter, instead of rtt_ms; () = rtt_ms
  shaper: str = "auto"
  subnet: str = "10.213.0.0/24"

  def __post_init__(self):
    if self.shaper not in SHAPERS:
      raise ValueError(f"netns shaper must be one of {SHAPERS}, got {self.shaper!r}")
    for name, value in (("rtt_ms", self.rtt_ms), ("jitter_ms", self.jitter_ms),
                        *((f"drafter_rtts_ms[{i}]", rtt)
                          for i, rtt in enumerate(self.drafter_rtts_ms))):
      if not value >= 0:
        raise ValueError(f"netns {name} must be >= 0, got {value}")
    if not 0 <= self.loss_pct < 100:
      raise ValueError(f"netns loss_pct must be in [0, 100), got {self.loss_pct}")
    try:
      network = ipaddress.IPv4Network(self.subnet)
    except ValueError as e:
      raise ValueError(f"netns subnet {self.subnet!r}: {e}") from None
    if network.prefixlen > 29:
      raise ValueError(f"netns subnet {self.subnet!r} is too small for a server and a drafter")

  def rtt_of(self, index: int) -> float:
    return self.drafter_rtts_ms[index] if self.drafter_rtts_ms else self.rtt_ms


def exec_prefix(namespace: str) -> list[str]:
  """The argv prefix that runs a command inside `namespace`."""
  return ["ip", "netns", "exec", namespace]


def _ms(value: float) -> str:
  return f"{value:g}ms"


def netem_argv(namespace: str, device: str, delay_ms: float, jitter_ms: float = 0.0,
               loss_pct: float = 0.0) -> list[str]:
  """`tc` shaping one direction: what leaves `device` in `namespace`."""
  argv = ["tc", "-n", namespace, "qdisc", "add", "dev", device, "root", "netem",
          "delay", _ms(delay_ms)]
  if jitter_ms:
    argv.append(_ms(jitter_ms))
  if loss_pct:
    argv += ["loss", f"{loss_pct:g}%"]
  return argv


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess:
  return subprocess.run(list(argv), capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S,
                        stdin=subprocess.DEVNULL, check=False)


def _run_checked(argv: Sequence[str]) -> None:
  done = _run(argv)
  if done.returncode != 0:
    raise NetnsError(f"`{' '.join(argv)}` failed: {(done.stderr or done.stdout).strip()}")


def _said(done: subprocess.CompletedProcess) -> str:
  return (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"


# -- can this machine do it ----------------------------------------------------------------------


def _has_net_admin() -> bool:
  if os.geteuid() == 0:
    return True
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("CapEff:"):
          return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
  except OSError:
    pass
  return False


def _owner_tag() -> str:
  return f"{os.getpid()}-{secrets.token_hex(3)}"


def _probe(shapers: Sequence[str]) -> dict[str, str | None]:
  """Tries what `shapers` need, in order, in a throw-away namespace, until one works: shaper ->
  None (works) or why not. A missing common prerequisite is every shaper's reason."""
  if sys.platform != "linux":
    return dict.fromkeys(shapers, f"network namespaces are Linux only (this is {sys.platform})")
  if not _has_net_admin():
    return dict.fromkeys(shapers, f"needs root or CAP_NET_ADMIN (this process runs as uid "
                         f"{os.geteuid()} without it)")
  if shutil.which("ip") is None:
    return dict.fromkeys(shapers, "iproute2's `ip` command is not installed "
                         "(Debian/Ubuntu: apt-get install iproute2)")
  tag = _owner_tag()
  probe = f"{PREFIX}{tag}-probe"
  added = _run(["ip", "netns", "add", probe])
  if added.returncode != 0:
    return dict.fromkeys(shapers, f"`ip netns add` was refused: {_said(added)}")
  try:
    entered = _run([*exec_prefix(probe), "true"])
    if entered.returncode != 0:
      return dict.fromkeys(shapers, f"`ip netns exec` was refused: {_said(entered)}")
    reasons: dict[str, str | None] = {}
    for shaper in shapers:  # in order of preference: the first that works is enough
      reasons[shaper] = _probe_netem(probe) if shaper == "netem" else _probe_tun(probe, tag)
      if reasons[shaper] is None:
        break
    return reasons
  finally:
    _run(["ip", "netns", "del", probe])


def _probe_netem(probe: str) -> str | None:
  if shutil.which("tc") is None:
    return "iproute2's `tc` command is not installed (Debian/Ubuntu: apt-get install iproute2)"
  done = _run(["ip", "-n", probe, "link", "add", "probe0", "type", "veth", "peer", "name",
               "probe1"])
  if done.returncode != 0:
    return f"veth pairs cannot be made: {_said(done)}"
  done = _run(netem_argv(probe, "probe0", 1.0, 0.5, 0.1))
  if done.returncode != 0:
    return (f"the kernel has no sch_netem (`tc qdisc add ... netem` said: {_said(done)}; "
            "modprobe sch_netem, or a kernel with CONFIG_NET_SCH_NETEM)")
  return None


def _probe_tun(probe: str, tag: str) -> str | None:
  name = f"sj{tag[-6:]}p"
  try:
    fd = link_shaper.open_tun(name)
  except OSError as e:
    return f"a TUN device cannot be made (/dev/net/tun: {e.strerror or e})"
  try:
    done = _run(["ip", "link", "set", "dev", name, "netns", probe])
    if done.returncode != 0:
      return f"a TUN device cannot be moved into a namespace: {_said(done)}"
    return None
  finally:
    os.close(fd)  # the device goes with its last descriptor


def check_supported(shaper: str = "auto") -> str | None:
  """None when this machine can build the topology with `shaper` ('auto': with either), else a
  sentence saying why not. Found by trying: a namespace, a veth pair with netem, a TUN device."""
  if shaper not in SHAPERS:
    raise ValueError(f"shaper must be one of {SHAPERS}, got {shaper!r}")
  try:
    return _resolve(shaper)[1]
  except (OSError, subprocess.SubprocessError) as e:
    return f"trying it failed: {e}"


def require_supported(shaper: str = "auto") -> None:
  """Raises NetnsError, saying why, unless `check_supported(shaper)` passes."""
  reason = check_supported(shaper)
  if reason is not None:
    raise NetnsError(_UNSUPPORTED + reason)


def _resolve(shaper: str) -> tuple[str | None, str | None]:
  """(the shaper to use, None) or (None, why none can be used)."""
  wanted = ("netem", "tun") if shaper == "auto" else (shaper,)
  reasons = _probe(wanted)
  for candidate in wanted:
    if candidate in reasons and reasons[candidate] is None:
      return candidate, None
  if len(wanted) == 1 or len(set(reasons.values())) == 1:
    return None, reasons[wanted[0]]
  return None, "; ".join(f"{name} shaper: {reasons[name]}" for name in wanted)


# -- left-overs ----------------------------------------------------------------------------------


def list_namespaces() -> list[str]:
  done = _run(["ip", "netns", "list"])
  if done.returncode != 0:
    return []
  return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def stale_namespaces(names: Sequence[str], include_live_owners: bool = False) -> list[str]:
  """Of `names`, ours (`PREFIX`) whose owner process is gone (or all of ours)."""
  stale = []
  for name in names:
    match = _NAME.match(name)
    if match and (include_live_owners or not _alive(int(match.group(1)))):
      stale.append(name)
  return stale


def cleanup_stale(include_live_owners: bool = False) -> list[str]:
  """Deletes the namespaces that runs of this module left behind (their owner died, e.g. by
  `kill -9`); returns their names. A namespace of a run still alive is kept unless
  `include_live_owners`. Their links go with them; a TUN shaper exits with its owner."""
  removed = []
  for name in stale_namespaces(list_namespaces(), include_live_owners):
    if _run(["ip", "netns", "del", name]).returncode == 0:
      removed.append(name)
  return removed


# -- the topology --------------------------------------------------------------------------------


class NetnsTopology:
  """A server namespace and one namespace per drafter, a shaped link from each drafter to the
  server. Pure until `open()` (or `with`): names, addresses and commands can be read first.

    with NetnsTopology(2, NetnsConfig(rtt_ms=14)) as topology:
      subprocess.run([*topology.server_prefix, "python", "-m", "launch.verifier",
                      f"--host={topology.server_address}", ...])
  """

  def __init__(self, num_drafters: int, config: NetnsConfig = NetnsConfig(), *,
               tag: str | None = None):
    if num_drafters < 1:
      raise NetnsError(f"a topology needs at least one drafter, got {num_drafters}")
    if config.drafter_rtts_ms and len(config.drafter_rtts_ms) != num_drafters:
      raise NetnsError(f"{len(config.drafter_rtts_ms)} per-drafter RTTs "
                       f"({', '.join(f'{r:g}' for r in config.drafter_rtts_ms)} ms) for "
                       f"{num_drafters} drafters: give one per drafter")
    network = ipaddress.IPv4Network(config.subnet)
    if num_drafters + 2 >= network.num_addresses:
      raise NetnsError(f"subnet {config.subnet} has no room for {num_drafters} drafters")
    self.num_drafters = num_drafters
    self.config = config
    self.tag = tag or _owner_tag()
    self.server_namespace = f"{PREFIX}{self.tag}-server"
    self.drafter_namespaces = [f"{PREFIX}{self.tag}-edge{i}" for i in range(num_drafters)]
    self.server_address = str(network[1])
    self.drafter_addresses = [str(network[i + 2]) for i in range(num_drafters)]
    self.shaper: str | None = None if config.shaper == "auto" else config.shaper
    self._shaper_process: subprocess.Popen | None = None
    self._opened = self._closed = False

  # -- names and commands (pure) -----------------------------------------------------------------

  @property
  def namespaces(self) -> list[str]:
    return [self.server_namespace, *self.drafter_namespaces]

  @property
  def server_prefix(self) -> list[str]:
    return exec_prefix(self.server_namespace)

  def drafter_prefix(self, index: int) -> list[str]:
    return exec_prefix(self.drafter_namespaces[index])

  def tun_names(self, index: int) -> tuple[str, str]:
    """The TUN devices of link `index` (server end, drafter end) while still in the root
    namespace, where names are shared with everything else: hence the run's tag (15 chars)."""
    short = self.tag.rsplit("-", 1)[-1][:6]
    return f"sj{short}s{index}", f"sj{short}d{index}"

  def namespace_commands(self) -> list[list[str]]:
    commands = []
    for namespace in self.namespaces:
      commands += [["ip", "netns", "add", namespace],
                   ["ip", "-n", namespace, "link", "set", "dev", "lo", "up"]]
    return commands

  def link_commands(self, shaper: str) -> list[list[str]]:
    """The links, for shaper 'netem' or 'tun' (whose devices the shaper process has made)."""
    if shaper not in ("netem", "tun"):
      raise ValueError(f"link_commands: shaper 'netem' or 'tun', got {shaper!r}")
    server, config = self.server_namespace, self.config
    commands = []
    for i, (drafter, address) in enumerate(zip(self.drafter_namespaces, self.drafter_addresses)):
      server_end = SERVER_LINK_NAME.format(index=i)
      if shaper == "netem":
        commands.append(["ip", "link", "add", server_end, "netns", server, "type", "veth",
                         "peer", "name", DRAFTER_LINK_NAME, "netns", drafter])
      else:
        server_tun, drafter_tun = self.tun_names(i)
        commands += [["ip", "link", "set", "dev", server_tun, "netns", server],
                     ["ip", "-n", server, "link", "set", "dev", server_tun, "name", server_end],
                     ["ip", "link", "set", "dev", drafter_tun, "netns", drafter],
                     ["ip", "-n", drafter, "link", "set", "dev", drafter_tun, "name",
                      DRAFTER_LINK_NAME]]
      commands += [
          ["ip", "-n", server, "addr", "add", self.server_address, "peer", address, "dev",
           server_end],
          ["ip", "-n", drafter, "addr", "add", address, "peer", self.server_address, "dev",
           DRAFTER_LINK_NAME],
          ["ip", "-n", server, "link", "set", "dev", server_end, "up"],
          ["ip", "-n", drafter, "link", "set", "dev", DRAFTER_LINK_NAME, "up"]]
      if shaper == "netem":
        half = config.rtt_of(i) / 2
        commands += [netem_argv(server, server_end, half, config.jitter_ms, config.loss_pct),
                     netem_argv(drafter, DRAFTER_LINK_NAME, half, config.jitter_ms,
                                config.loss_pct)]
    return commands

  def shaper_spec(self) -> dict:
    """What the TUN shaper process is told: its devices and each link's one-way shape."""
    return {"links": [{"server_tun": self.tun_names(i)[0], "drafter_tun": self.tun_names(i)[1],
                       "delay_ms": self.config.rtt_of(i) / 2, "jitter_ms": self.config.jitter_ms,
                       "loss_pct": self.config.loss_pct} for i in range(self.num_drafters)],
            "seed": None}

  def describe(self) -> str:
    config = self.config
    links = ", ".join(f"edge{i} {address} RTT {config.rtt_of(i):g} ms"
                      for i, address in enumerate(self.drafter_addresses))
    return (f"network namespaces {PREFIX}{self.tag}-* ({self.shaper or config.shaper} shaper): "
            f"verifier at {self.server_address}; {links}; jitter +-{config.jitter_ms:g} ms and "
            f"loss {config.loss_pct:g} % each way")

  # -- lifecycle ---------------------------------------------------------------------------------

  def open(self) -> NetnsTopology:
    """Builds the namespaces and links; on any failure removes what it made and raises
    NetnsError (saying why the machine does not allow it, when that is the cause)."""
    if self._opened:
      raise NetnsError("NetnsTopology.open(): already opened")
    self._opened = True
    shaper, reason = _resolve(self.config.shaper)
    if shaper is None:
      raise NetnsError(_UNSUPPORTED + str(reason))
    self.shaper = shaper
    atexit.register(self.close)  # also when the owner exits without closing
    try:
      for argv in self.namespace_commands():
        _run_checked(argv)
      if shaper == "tun":
        self._start_shaper()
      for argv in self.link_commands(shaper):
        _run_checked(argv)
    except BaseException:
      self.close()
      raise
    return self

  def _start_shaper(self) -> None:
    # By file path: the shaper needs only the standard library, not the package's imports.
    # Its own session: a Ctrl-C at the terminal must not cut the links before the children
    # that use them are stopped. It exits when its stdin closes, i.e. with this process.
    process = subprocess.Popen([sys.executable, link_shaper.__file__,
                                json.dumps(self.shaper_spec())],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    self._shaper_process = process
    stdout = process.stdout
    assert stdout is not None  # stdout=PIPE
    with selectors.DefaultSelector() as selector:
      selector.register(stdout, selectors.EVENT_READ)
      ready = selector.select(_SHAPER_READY_S)
    if not ready or stdout.readline().strip() != b"ready":
      process.kill()
      _, err = process.communicate()
      said = err.decode(errors="replace").strip()[-2000:]
      raise NetnsError(f"the TUN link shaper did not start: {said}" if said else
                       f"the TUN link shaper did not start in {_SHAPER_READY_S:.0f} s")

  def close(self) -> None:
    """Stops the shaper and deletes the namespaces (their links go with them). Idempotent; a
    failure is logged, never raised over the exception that may be unwinding."""
    if self._closed:
      return
    self._closed = True
    atexit.unregister(self.close)
    process, self._shaper_process = self._shaper_process, None
    if process is not None:
      if process.stdin is not None:
        process.stdin.close()  # its end of file is the shaper's signal to stop
      try:
        process.wait(5.0)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
      for stream in (process.stdout, process.stderr):
        if stream is not None:
          stream.close()
    existing = set(list_namespaces())
    for namespace in self.namespaces:
      if namespace in existing:
        done = _run(["ip", "netns", "del", namespace])
        if done.returncode != 0:
          _log.warning("could not delete network namespace %s: %s", namespace, _said(done))

  def __enter__(self) -> NetnsTopology:
    return self.open()

  def __exit__(self, *exc_info) -> None:
    self.close()
