"""The one-machine cluster behind `launch/local.py`: a verifier and N drafter processes.

`run_local` writes the resolved config to the run folder and starts the verifier
(`launch/verifier.py`) and the drafters (`launch/drafter.py`) at once: each drafter loads and
compiles its draft model while the verifier loads and compiles the target, and then waits for
the verifier's health check. It shows one progress bar per drafter (read from the drafters'
JSONL event logs, so no extra channel is needed), stops the verifier once every request is
done, optionally runs server-only baselines on the same requests (`launch/server_only.py`), and
summarizes every run with `metrics.py` into the `report.py` table.

Serve mode (`LocalOptions.serve`) starts the verifier and one drafter that serves the
OpenAI-compatible HTTP API and a chat page instead of replaying the workload, prints the URLs,
and keeps both up until Ctrl-C (or SIGTERM), or until a child dies (then `ChildFailed` with its
log's tail); no baselines, no summary.

The verifier's port is chosen here, before any child starts (the drafters need it on their
command line), and held until the verifier serves by `_PortHolder`, a stand-in that answers
health checks NOT_SERVING on it (see there for why).

Transport security: by default `run_local` writes a throw-away CA, a server and a client
certificate and one bearer token per drafter into `<out_dir>/security/` (`security.make_test_pki`,
`make_tokens`), and starts the verifier with mutual TLS and tokens and each drafter with its own
token (read from a file, never on a command line). `LocalOptions.insecure` keeps plaintext.

Edges as real hosts (`LocalOptions.netns`, `launch.local --netns`): the verifier and each drafter
run in network namespaces of their own, joined by links that delay, jitter and drop packets
(`netns.py`), so the RTT is real and `edge.simulated_rtt_ms` is set to 0. The verifier listens on
its namespace's address, which the server certificate names; the drafters dial it. This process
stays in the root namespace and never dials the verifier (it reads the port and event files), so
it needs no link of its own; only the port holder must sit beside the verifier, so it runs there
as a small child process (`hold_port`) on the fixed `netns.SERVER_PORT` of a namespace nothing
else uses. The topology is torn down after the children are stopped, also on errors.

Each child runs in its own process group and watches this process (`processes.py`): Ctrl-C here,
an exception, or even `kill -9` of this process ends every child. This module only orchestrates:
it loads no model and runs no JAX computation itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from concurrent import futures
from typing import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from specedge_jax.measure import events as events_lib
from specedge_jax.measure import metrics
from specedge_jax.serving import netns as netns_lib
from specedge_jax.serving import processes
from specedge_jax.serving import security
from specedge_jax.serving.baselines import BASELINES, SYSTEM_NAMES
from specedge_jax.serving.servicer import SERVICE_NAME
from specedge_jax.serving.serving_config import ServingConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPECEDGE_RUN = "specedge"
VERIFIER_HOST = "127.0.0.1"  # the server certificate names it (IP SAN); the drafters dial it


@dataclasses.dataclass(frozen=True)
class LocalOptions:
  out_dir: str
  verifier_cpus: tuple[int, ...] = ()  # () = no pinning
  # The verifier's network threads on these cores once it serves (launch.verifier --io_cpus;
  # serving/io_threads.py), its compute staying on verifier_cpus; () = no move.
  verifier_io_cpus: tuple[int, ...] = ()
  drafter_cpus: tuple[int, ...] = ()
  baselines: tuple[str, ...] = ()  # server-only runs after the SpecEdge run
  # The run_id every SpecEdge event carries (a sweep names each of its runs; see metrics.py).
  run_id: str = SPECEDGE_RUN
  startup_timeout_s: float = 900.0  # loading + compiling the verifier
  run_timeout_s: float = 3600.0
  # JAX's persistent compilation cache, shared by the children: the drafters compile the same
  # programs, and reruns start in seconds. '' turns it off.
  compilation_cache_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "specedge_jax",
                                            "xla")
  # Plaintext gRPC without tokens (--allow_insecure to every child); default: TLS and tokens.
  insecure: bool = False
  # Serve mode: the verifier and one drafter serving the OpenAI-compatible HTTP API and the chat
  # page on http_host:http_port (0: any free port) until Ctrl-C, instead of the workload.
  serve: bool = False
  http_port: int = 8000
  http_host: str = "127.0.0.1"
  # Run the verifier and each drafter in a network namespace of its own over shaped links
  # (netns.py); None: all in this machine's namespace, on loopback.
  netns: netns_lib.NetnsConfig | None = None

  def __post_init__(self):
    unknown = [b for b in self.baselines if b not in BASELINES]
    if unknown:
      raise ValueError(f"unknown baselines {unknown}; known: {BASELINES}")
    if self.serve and self.baselines:
      raise ValueError("serve mode runs no baselines")
    if not 0 <= self.http_port < 65536:
      raise ValueError(f"http_port must be in [0, 65536), got {self.http_port}")
    if self.serve and self.netns is not None:
      # The HTTP edge would listen inside its namespace, out of this machine's reach.
      raise ValueError("serve mode does not run in network namespaces (--netns)")


@dataclasses.dataclass(frozen=True)
class LocalResult:
  summaries: list[metrics.RunSummary]  # empty in serve mode
  event_paths: dict[str, list[str]]  # run id -> its logs
  # run id -> request id -> generated tokens (None: its request_end event has no output_tokens,
  # an optional field of the event schema)
  outputs: dict[str, dict[str, list[int] | None]]
  out_dir: str
  # This process's milestones (name -> time.time()), also in <out_dir>/timeline.json: with the
  # children's logs they give the start-up breakdown (bench/startup.py).
  timeline: dict[str, float] = dataclasses.field(default_factory=dict)


class _EventTail:
  """Reads the complete lines appended to a JSONL file since the last call."""

  def __init__(self, path: str):
    self.path = path
    self._offset = 0
    self.finished_requests = 0
    self.tokens = 0

  def poll(self) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      f.seek(self._offset)
      chunk = f.read()
    complete = chunk[:chunk.rfind("\n") + 1]
    self._offset += len(complete.encode())
    for line in complete.splitlines():
      event = json.loads(line)
      if event["kind"] == "request_end":
        self.finished_requests += 1
      elif event["kind"] == "request_step":
        self.tokens += int(event["n_tokens"])


class ChildFailed(RuntimeError):
  pass


class _PortHolder:
  """Holds the verifier's port from before the children start until the verifier serves on it,
  answering health checks there with NOT_SERVING.

  The drafters start beside the verifier and are often ready before it. Against a closed port a
  gRPC channel backs off between connection attempts (about 1, 1.6, 2.6, 4.2 s), which cost a
  waiting drafter up to 4 s after the verifier came up (measured); connected to this stand-in,
  it keeps polling over a live connection, and when the stand-in stops (at the verifier's port
  file) it reconnects at once, to the verifier. The verifier binds the same port beside it (gRPC
  servers set SO_REUSEPORT), so the port is never free between being chosen and being served.
  """

  def __init__(self, host: str, credentials: grpc.ServerCredentials | None, port: int = 0):
    self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, self._server)
    address = f"{host}:{port}"
    self.port = (self._server.add_secure_port(address, credentials) if credentials is not None
                 else self._server.add_insecure_port(address))
    if not self.port:
      raise RuntimeError(f"the port holder could not bind {address}")
    self._server.start()

  def release(self) -> None:
    self._server.stop(grace=None)


@dataclasses.dataclass(frozen=True)
class _Files:
  """Where a run's children write: logs, event logs, port files (all in out_dir)."""
  out_dir: str
  num_drafters: int

  def path(self, name: str) -> str:
    return os.path.join(self.out_dir, name)

  @property
  def drafters(self) -> list[str]:
    return [f"drafter{i}" for i in range(self.num_drafters)]

  def log(self, child: str) -> str:
    return self.path(f"{child}.log")

  def events(self, child: str) -> str:
    return self.path(f"{child}.jsonl")

  @property
  def port_file(self) -> str:
    return self.path("verifier.port")

  @property
  def http_port_file(self) -> str:
    return self.path("http.port")


def hold_port(host: str, port: int, parent_pid: int, server_flags: Sequence[str]) -> None:
  """`_PortHolder` as a process of its own, for a verifier in another network namespace, where
  the launcher cannot bind: holds host:port until SIGTERM (then exits 0, which the launcher's
  failure checks take as a clean stop) or until `parent_pid` is gone."""
  holder = _PortHolder(host, _holder_credentials(server_flags), port=port)

  def stop(signum, frame):
    holder.release()
    os._exit(0)  # pylint: disable=protected-access (no teardown of gRPC's threads to wait for)

  signal.signal(signal.SIGTERM, stop)
  processes.exit_with_parent(parent_pid)
  while True:
    time.sleep(3600)


def holder_argv(host: str, port: int, server_flags: Sequence[str]) -> list[str]:
  """The command line of `hold_port` in a child (its caller adds the namespace prefix)."""
  # SIGTERM means "stop" (exit 0) from the first line: the launcher stops the holder once the
  # verifier serves, which with a warm compilation cache may come before its imports are done.
  code = ("import os, signal, sys; signal.signal(signal.SIGTERM, lambda *_: os._exit(0)); "
          "from specedge_jax.serving import local; "
          "local.hold_port(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])")
  return [sys.executable, "-c", code, host, str(port), str(os.getpid()), *server_flags]


def _common_flags(config_path: str, cpus: Sequence[int]) -> list[str]:
  flags = [f"--config_json={config_path}", f"--parent_pid={os.getpid()}"]
  if cpus:
    flags.append(f"--cpus={','.join(str(c) for c in cpus)}")
  return flags


def child_argvs(options: LocalOptions, num_drafters: int, *, config_path: str, port: int,
                server_security: Sequence[str], drafter_security: Sequence[Sequence[str]],
                topology: netns_lib.NetnsTopology | None = None,
                draft_dirs: Sequence[str] = ()) -> dict[str, list[str]]:
  """The command line of every child of the SpecEdge run (serve mode: of the verifier and its
  one HTTP drafter), by name, in start order; with a `topology`, each run in its namespace.
  Drafter i gets `--draft=draft_dirs[i]` (`run_local` passes `models.draft_for(i)`, so each
  drafter's model shows on its command line); () leaves the choice to the drafter's config.
  Pure: starts nothing, writes nothing."""
  if draft_dirs and len(draft_dirs) != num_drafters:
    raise ValueError(f"{len(draft_dirs)} draft_dirs for {num_drafters} drafters")
  files = _Files(options.out_dir, num_drafters)
  host = topology.server_address if topology is not None else VERIFIER_HOST
  server_prefix = topology.server_prefix if topology is not None else []
  argvs = {"verifier": server_prefix + processes.python_module_argv(
      "launch.verifier", *_common_flags(config_path, options.verifier_cpus),
      *([f"--io_cpus={','.join(str(c) for c in options.verifier_io_cpus)}"]
        if options.verifier_io_cpus else []), f"--host={host}",
      f"--port={port}", f"--port_file={files.port_file}",
      f"--event_log={files.events('verifier')}", f"--run_id={options.run_id}",
      *server_security)}
  for i, name in enumerate(files.drafters):
    http = []
    if options.serve:
      http = [f"--http_port={options.http_port}", f"--http_host={options.http_host}",
              f"--http_port_file={files.http_port_file}"]
    drafter_prefix = topology.drafter_prefix(i) if topology is not None else []
    draft = [f"--draft={draft_dirs[i]}"] if draft_dirs else []
    argvs[name] = drafter_prefix + processes.python_module_argv(
        "launch.drafter", *_common_flags(config_path, options.drafter_cpus),
        f"--server={host}:{port}", f"--client_index={i}",
        f"--event_log={files.events(name)}", f"--run_id={options.run_id}", *drafter_security[i],
        *draft, *http)
  return argvs


def _security_flags(out_dir: str, num_drafters: int, insecure: bool,
                    host: str = VERIFIER_HOST) -> tuple[list[str], list[list[str]]]:
  """The verifier's and each drafter's security flags; writes the test PKI and tokens."""
  if insecure:
    return ["--allow_insecure"], [["--allow_insecure"] for _ in range(num_drafters)]
  folder = os.path.join(out_dir, "security")
  # The server certificate names `host` (an IP SAN): the drafters connect to that address
  # (127.0.0.1, or the verifier's namespace address under --netns).
  pki = security.make_test_pki(folder, hosts=tuple(dict.fromkeys((host, VERIFIER_HOST,
                                                                  "localhost"))))
  names = [f"edge{i}" for i in range(num_drafters)]  # the drafters' client_id (runners.py)
  tokens = security.make_tokens(folder, names)
  server = [f"--tls_cert={pki['server_cert']}", f"--tls_key={pki['server_key']}",
            f"--tls_client_ca={pki['ca_cert']}", f"--auth_tokens={tokens}"]
  clients = [[f"--tls_ca={pki['ca_cert']}", f"--tls_client_cert={pki['client_cert']}",
              f"--tls_client_key={pki['client_key']}",
              f"--auth_token_file={security.token_file(folder, name)}"] for name in names]
  return server, clients


def _holder_credentials(server_flags: Sequence[str]) -> grpc.ServerCredentials | None:
  """The verifier's TLS credentials, read back from its flags, for the port holder (which
  serves only the health service, open to all: no tokens)."""
  values = dict(flag[2:].split("=", 1) for flag in server_flags if "=" in flag)
  return security.server_credentials(security.ServerSecurity(
      cert_file=values.get("tls_cert", ""), key_file=values.get("tls_key", ""),
      client_ca_file=values.get("tls_client_ca", ""),
      allow_insecure="--allow_insecure" in server_flags))


def _check(children: processes.ChildProcesses, logs: dict[str, str],
           names: Sequence[str] | None = None) -> None:
  """Raises ChildFailed, with its log's tail, for a child (of `names`, default any) that exited
  with a non-zero status."""
  failed = {name: code for name, code in children.failed().items()
            if names is None or name in names}
  if failed:
    name, code = next(iter(failed.items()))
    raise ChildFailed(f"{name} exited with status {code}; the end of {logs[name]}:\n"
                      f"{processes.log_tail(logs[name])}")


def run_local(config: ServingConfig, options: LocalOptions,
              console: Console | None = None) -> LocalResult:
  """Runs SpecEdge (and any baselines) on this machine; returns the summaries.

  In serve mode, serves until Ctrl-C or SIGTERM instead and returns no summaries."""
  timeline = {"run_local": time.time()}
  console = console or Console()
  topology = None
  if options.netns is not None:  # checked (RTTs per drafter, this machine) before any writing
    topology = netns_lib.NetnsTopology(config.edge.num_drafters, options.netns)
    netns_lib.require_supported(options.netns.shaper)
    # The links delay every packet now: a simulated delay on top would count the RTT twice.
    config = dataclasses.replace(config, edge=dataclasses.replace(config.edge,
                                                                  simulated_rtt_ms=0.0))
  os.makedirs(options.out_dir, exist_ok=True)
  config_path = os.path.join(options.out_dir, "config.json")
  config.save_json(config_path)
  files = _Files(options.out_dir, 1 if options.serve else config.edge.num_drafters)
  children = processes.ChildProcesses()
  logs: dict[str, str] = {}
  event_paths: dict[str, list[str]] = {}
  server_flags, drafter_flags = _security_flags(
      options.out_dir, files.num_drafters, options.insecure,
      host=topology.server_address if topology is not None else VERIFIER_HOST)
  holder = None
  try:
    # Logs append and port files signal readiness: a rerun into the same folder must not mix
    # runs or find the last run's port.
    for path in [files.port_file, files.http_port_file, files.events("verifier"),
                 *map(files.events, files.drafters)]:
      if os.path.exists(path):
        os.remove(path)
    if topology is None:
      holder = _PortHolder(VERIFIER_HOST, _holder_credentials(server_flags))
      port = holder.port
    else:
      netns_lib.cleanup_stale()  # namespaces of runs whose launcher died (kill -9)
      with console.status("building the network namespaces ..."):
        topology.open()
      timeline["netns_ready"] = time.time()
      console.print(f"{topology.describe()}; edge.simulated_rtt_ms set to 0: the RTT is real",
                    soft_wrap=True, highlight=False)  # one line, whatever the terminal's width
      port = netns_lib.SERVER_PORT
      logs["port_holder"] = files.log("port_holder")
      children.start("port_holder", topology.server_prefix + holder_argv(
          topology.server_address, port, server_flags), logs["port_holder"],
                     env=_child_env(options))
    argvs = child_argvs(options, files.num_drafters, config_path=config_path, port=port,
                        server_security=server_flags, drafter_security=drafter_flags,
                        topology=topology,
                        draft_dirs=[config.models.draft_for(i) for i in range(files.num_drafters)])
    for name, argv in argvs.items():
      logs[name] = files.log(name)
      children.start(name, argv, logs[name], env=_child_env(options))
    timeline["children_started"] = time.time()
    event_paths[options.run_id] = [files.events(name) for name in argvs]
    what = "the verifier and the HTTP drafter" if options.serve else \
        f"the verifier and {files.num_drafters} drafters"
    with console.status(f"starting {what} (loading, compiling) ..."):
      port = _wait_for_port(files.port_file, children, logs, "verifier",
                            options.startup_timeout_s)
      if holder is not None:
        holder.release()
      else:
        children.stop("port_holder")
      timeline["verifier_serving"] = time.time()
      host = topology.server_address if topology is not None else VERIFIER_HOST
      console.print(f"verifier serving on {host}:{port} (log: {logs['verifier']})")
      if options.serve:
        http_port = _wait_for_port(files.http_port_file, children, logs, "drafter0",
                                   options.startup_timeout_s)
    if options.serve:
      _serve(console, children, logs, options, http_port)
      return LocalResult(summaries=[], event_paths=event_paths, outputs={},
                         out_dir=options.out_dir, timeline=timeline)

    # Each drafter's share of the sampled set (by workload.mode), for its bar and for knowing
    # when it is done.
    total = _count_requests(config)
    shares = [config.workload.client_share(total, i, files.num_drafters)
              for i in range(files.num_drafters)]
    tails = [_EventTail(files.events(name)) for name in files.drafters]
    _follow(console, children, logs, files.drafters, tails, shares, options.run_timeout_s,
            title="SpecEdge")
    timeline["drafters_done"] = time.time()
    # Every request has ended, so no drafter calls the verifier again: stop it while the
    # drafters exit (a Python process with JAX and torch loaded takes ~1 s to).
    children.stop("verifier")
    timeline["verifier_stopped"] = time.time()
    _wait_for_exit(children, logs, files.drafters, options.run_timeout_s)
    timeline["drafters_exited"] = time.time()

    for kind in options.baselines:
      run_id = SYSTEM_NAMES[kind]
      path = os.path.join(options.out_dir, f"{run_id}.jsonl")
      if os.path.exists(path):
        os.remove(path)
      logs[run_id] = os.path.join(options.out_dir, f"{run_id}.log")
      children.start(run_id, processes.python_module_argv(
          "launch.server_only", *_common_flags(config_path, options.verifier_cpus),
          f"--baseline={kind}", f"--event_log={path}", f"--run_id={run_id}"), logs[run_id],
          env=_child_env(options))
      _follow(console, children, logs, [run_id], [_EventTail(path)],
              [config.workload.server_only_total(total, files.num_drafters)],
              options.run_timeout_s, title=f"baseline: {kind}")
      _wait_for_exit(children, logs, [run_id], options.run_timeout_s)
      event_paths[run_id] = [path]
  finally:
    if holder is not None:
      holder.release()  # again on the error paths; a no-op on a stopped server
    children.kill_all()
    if topology is not None:  # after the children: nothing may still use a link
      topology.close()

  all_events = list(events_lib.read_events(
      [p for paths in event_paths.values() for p in paths if os.path.exists(p)]))
  _, summaries = metrics.summarize_events(all_events)
  outputs: dict[str, dict[str, list[int] | None]] = {}
  for event in all_events:
    if event["kind"] == "request_end":
      outputs.setdefault(event.get("run_id") or event["system"], {})[event["request_id"]] = \
          event.get("output_tokens")
  with open(os.path.join(options.out_dir, "summary.json"), "w") as f:
    json.dump([s.to_dict() for s in summaries], f, indent=2)
  timeline["summarized"] = time.time()
  with open(os.path.join(options.out_dir, "timeline.json"), "w") as f:
    json.dump(timeline, f, indent=2)
  return LocalResult(summaries=summaries, event_paths=event_paths, outputs=outputs,
                     out_dir=options.out_dir, timeline=timeline)


def print_summary(result: LocalResult, console: Console | None = None) -> None:
  # Imported here: report loads matplotlib (~0.3 s), which the start-up need not wait for.
  from specedge_jax.measure import report  # pylint: disable=g-import-not-at-top

  console = console or Console()
  console.print(report.summary_table(result.summaries))
  console.print(f"events, logs and summary.json in {result.out_dir}")


def http_urls(host: str, port: int) -> tuple[str, str]:
  """The chat page's URL and the OpenAI API base for a drafter serving HTTP on host:port."""
  if host in ("", "0.0.0.0", "::"):  # every interface: this machine reaches it on loopback
    host = "127.0.0.1"
  if ":" in host:
    host = f"[{host}]"
  return f"http://{host}:{port}/", f"http://{host}:{port}/v1"


class _Interrupted(Exception):
  pass


def _serve(console: Console, children: processes.ChildProcesses, logs: dict[str, str],
           options: LocalOptions, http_port: int) -> None:
  """Keeps the children up until Ctrl-C or SIGTERM (then stops them cleanly, drafter first) or
  until one exits (then ChildFailed with its log's tail)."""
  page, api = http_urls(options.http_host, http_port)
  console.print(f"chat page: [bold]{page}[/bold]\nOpenAI API base: [bold]{api}[/bold] "
                f"(log: {logs['drafter0']})")
  previous = None
  if threading.current_thread() is threading.main_thread():  # signal handlers live there only

    def interrupt(signum, frame):
      raise _Interrupted()

    previous = signal.signal(signal.SIGTERM, interrupt)
  try:
    with console.status("serving; Ctrl-C stops"):
      while True:
        _check(children, logs)
        ended = [name for name, child in children.children.items() if child.poll() is not None]
        if ended:  # a served child never exits by itself: one that did with status 0 failed too
          raise ChildFailed(f"{ended[0]} exited; the end of {logs[ended[0]]}:\n"
                            f"{processes.log_tail(logs[ended[0]])}")
        time.sleep(0.25)
  except (KeyboardInterrupt, _Interrupted):
    with console.status("stopping the drafter and the verifier ..."):
      children.stop("drafter0")  # its requests end and free their sessions, then the verifier
      children.stop("verifier")  # drains
    console.print("stopped")
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def _child_env(options: LocalOptions) -> dict[str, str]:
  # Unbuffered child output keeps the logs current; the repo root on the path lets
  # `python -m launch.x` import the launchers whatever the caller's working directory.
  path = os.environ.get("PYTHONPATH", "")
  env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": REPO_ROOT + (os.pathsep + path if path else "")}
  if options.compilation_cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=options.compilation_cache_dir,
               # Cache every program: ours are many and small, each below the default threshold.
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _count_requests(config: ServingConfig) -> int:
  """The requests in the run's sampled set. With workload.num_requests set that is the number (a
  child refuses a set that holds fewer), found without loading the tokenizer: transformers took
  ~2 s of this process's start-up and ~0.5 s of its exit. Else the whole sampled set counts,
  loaded the way the children load it."""
  if config.workload.num_requests:
    return config.workload.num_requests
  from specedge_jax.serving import workload  # pylint: disable=g-import-not-at-top (transformers)

  return len(workload.load_requests(config))


def _wait_for_port(port_file: str, children, logs, child: str, timeout_s: float) -> int:
  deadline = time.monotonic() + timeout_s
  while not os.path.exists(port_file):
    _check(children, logs)
    if time.monotonic() > deadline:
      raise ChildFailed(f"{child} did not start serving in {timeout_s:.0f} s; the end of "
                        f"{logs[child]}:\n{processes.log_tail(logs[child])}")
    time.sleep(0.1)
  with open(port_file) as f:
    return int(f.read())


def _wait_for_exit(children, logs, names, timeout_s: float) -> None:
  """Until the named children exit; raises if one fails or they outlast timeout_s."""
  deadline = time.monotonic() + timeout_s
  while not all(children.children[name].poll() is not None for name in names):
    _check(children, logs, names)
    if time.monotonic() > deadline:
      raise ChildFailed(f"{', '.join(names)} did not exit in {timeout_s:.0f} s")
    time.sleep(0.05)
  _check(children, logs, names)


def _follow(console, children, logs, names, tails, totals, timeout_s: float, title: str):
  """Progress bars until each named child has ended its `totals` requests (or exited); raises if
  any child fails."""
  deadline = time.monotonic() + timeout_s
  columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
             TextColumn("requests  {task.fields[tokens]} tokens"), TimeElapsedColumn())
  with Progress(*columns, console=console) as progress:
    tasks = [progress.add_task(f"{title} {name}", total=total, tokens=0)
             for name, total in zip(names, totals)]
    while True:
      for task, tail in zip(tasks, tails):
        tail.poll()
        progress.update(task, completed=tail.finished_requests, tokens=tail.tokens)
      _check(children, logs)
      if all(children.children[name].poll() is not None or tail.finished_requests >= total
             for name, tail, total in zip(names, tails, totals)):
        break
      if time.monotonic() > deadline:
        raise ChildFailed(f"{title} did not finish in {timeout_s:.0f} s")
      time.sleep(0.1)
