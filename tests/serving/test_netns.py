"""Edges as real hosts: the network-namespace topology (serving/netns.py), its userspace shaper
(serving/link_shaper.py) and `launch.local --netns`.

The command construction, the shaper's schedule and the launcher's plumbing need no privileges.
The live tests build real namespaces and skip, with `check_supported`'s reason, where the machine
does not allow them: the RTT of the links measured with a TCP echo (ping need not be installed),
the teardown on errors and of left-overs, and a greedy run of the main job whose outputs equal
target-only decoding and whose drafters measure the links' RTT."""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys

import pytest
from test_local_cluster import local_argv  # the main job on the tiny served pair, cheaply

from specedge_jax.serving import link_shaper, local, netns

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TAG = "4242-abcdef"


def _live(shaper: str = "auto"):
  reason = netns.check_supported(shaper)
  if reason is not None:
    pytest.skip(f"network namespaces ({shaper}): {reason}")


# -- pure: config, names, commands ---------------------------------------------------------------


def test_config_is_checked():
  for bad in ({"shaper": "wire"}, {"rtt_ms": -1.0}, {"jitter_ms": -0.5}, {"loss_pct": 100.0},
              {"drafter_rtts_ms": (5.0, -1.0)}, {"subnet": "10.0.0.0/30"},
              {"subnet": "not-a-subnet"}):
    with pytest.raises(ValueError, match="netns"):
      netns.NetnsConfig(**bad)
  config = netns.NetnsConfig(rtt_ms=14.0, drafter_rtts_ms=(5.0, 40.0))
  assert (config.rtt_of(0), config.rtt_of(1)) == (5.0, 40.0)
  assert netns.NetnsConfig(rtt_ms=14.0).rtt_of(3) == 14.0
  with pytest.raises(netns.NetnsError, match="3 per-drafter RTTs .* for 2 drafters"):
    netns.NetnsTopology(2, netns.NetnsConfig(drafter_rtts_ms=(5.0, 14.0, 40.0)))


def test_names_addresses_and_exec_prefix():
  topology = netns.NetnsTopology(3, tag=TAG)
  assert topology.server_namespace == "sej-4242-abcdef-server"
  assert topology.drafter_namespaces == [f"sej-4242-abcdef-edge{i}" for i in range(3)]
  assert topology.server_address == "10.213.0.1"
  assert topology.drafter_addresses == ["10.213.0.2", "10.213.0.3", "10.213.0.4"]
  assert topology.server_prefix == ["ip", "netns", "exec", "sej-4242-abcdef-server"]
  assert topology.drafter_prefix(2) == netns.exec_prefix("sej-4242-abcdef-edge2")
  # TUN devices are named in the root namespace first: unique per run, within IFNAMSIZ.
  names = [name for i in range(250) for name in netns.NetnsTopology(250, tag=TAG).tun_names(i)]
  assert len(set(names)) == len(names) and max(map(len, names)) <= 15
  assert netns.NetnsTopology(1).tag != netns.NetnsTopology(1).tag  # parallel runs differ
  assert netns.NetnsTopology(1).tag.startswith(f"{os.getpid()}-")  # cleanup_stale's owner


def test_namespace_commands_bring_up_loopback_everywhere():
  topology = netns.NetnsTopology(2, tag=TAG)
  commands = topology.namespace_commands()
  for namespace in topology.namespaces:
    assert ["ip", "netns", "add", namespace] in commands
    assert ["ip", "-n", namespace, "link", "set", "dev", "lo", "up"] in commands


def test_netem_commands_shape_both_ends_with_half_the_rtt():
  config = netns.NetnsConfig(rtt_ms=14.0, jitter_ms=1.5, loss_pct=0.2,
                             drafter_rtts_ms=(5.0, 14.0, 40.0))
  topology = netns.NetnsTopology(3, config, tag=TAG)
  commands = topology.link_commands("netem")
  server = topology.server_namespace
  for i, (drafter, half) in enumerate(zip(topology.drafter_namespaces, ("2.5ms", "7ms", "20ms"))):
    assert ["ip", "link", "add", f"edge{i}", "netns", server, "type", "veth", "peer", "name",
            "uplink", "netns", drafter] in commands
    address = topology.drafter_addresses[i]
    assert ["ip", "-n", server, "addr", "add", "10.213.0.1", "peer", address, "dev",
            f"edge{i}"] in commands
    assert ["ip", "-n", drafter, "addr", "add", address, "peer", "10.213.0.1", "dev",
            "uplink"] in commands
    for namespace, device in ((server, f"edge{i}"), (drafter, "uplink")):
      assert ["tc", "-n", namespace, "qdisc", "add", "dev", device, "root", "netem", "delay",
              half, "1.5ms", "loss", "0.2%"] in commands
      assert ["ip", "-n", namespace, "link", "set", "dev", device, "up"] in commands
  # A link exists before it is addressed, and is up before it is shaped.
  veth = commands.index(["ip", "link", "add", "edge0", "netns", server, "type", "veth", "peer",
                         "name", "uplink", "netns", topology.drafter_namespaces[0]])
  up = commands.index(["ip", "-n", server, "link", "set", "dev", "edge0", "up"])
  assert veth < up < commands.index(netns.netem_argv(server, "edge0", 2.5, 1.5, 0.2))
  assert not any(c[:3] == ["ip", "link", "set"] for c in commands)  # nothing moved: no TUNs


def test_netem_argv_leaves_out_what_is_zero():
  assert netns.netem_argv("ns", "eth0", 7.0) == ["tc", "-n", "ns", "qdisc", "add", "dev", "eth0",
                                                 "root", "netem", "delay", "7ms"]
  assert netns.netem_argv("ns", "eth0", 0.25, 0.0, 1.0)[-3:] == ["0.25ms", "loss", "1%"]


def test_tun_commands_move_and_rename_the_shapers_devices():
  config = netns.NetnsConfig(rtt_ms=14.0, jitter_ms=1.0, loss_pct=0.1, drafter_rtts_ms=(6., 30.))
  topology = netns.NetnsTopology(2, config, tag=TAG)
  commands = topology.link_commands("tun")
  assert not any(c[0] == "tc" or "veth" in c for c in commands)
  for i, drafter in enumerate(topology.drafter_namespaces):
    server_tun, drafter_tun = topology.tun_names(i)
    moves = [["ip", "link", "set", "dev", server_tun, "netns", topology.server_namespace],
             ["ip", "-n", topology.server_namespace, "link", "set", "dev", server_tun, "name",
              f"edge{i}"],
             ["ip", "link", "set", "dev", drafter_tun, "netns", drafter],
             ["ip", "-n", drafter, "link", "set", "dev", drafter_tun, "name", "uplink"]]
    first = commands.index(moves[0])
    assert commands[first:first + 4] == moves  # renamed while still down
  spec = topology.shaper_spec()
  assert [link["delay_ms"] for link in spec["links"]] == [3.0, 15.0]  # one way: half the RTT
  assert {(link["jitter_ms"], link["loss_pct"]) for link in spec["links"]} == {(1.0, 0.1)}
  assert spec["links"][1]["drafter_tun"] == topology.tun_names(1)[1]
  with pytest.raises(ValueError, match="shaper"):
    topology.link_commands("auto")


def test_stale_namespaces_are_those_of_dead_owners():
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  names = [f"sej-{gone.pid}-0a0b0c-server", f"sej-{gone.pid}-0a0b0c-edge0",
           f"sej-{os.getpid()}-0d0e0f-server", "someone-elses", "sej-notours"]
  assert netns.stale_namespaces(names) == names[:2]
  assert netns.stale_namespaces(names, include_live_owners=True) == names[:3]


def test_check_supported_names_missing_privileges_and_tools(monkeypatch):
  monkeypatch.setattr(netns, "_has_net_admin", lambda: False)
  assert "CAP_NET_ADMIN" in netns.check_supported()
  monkeypatch.setattr(netns, "_has_net_admin", lambda: True)
  real_which = netns.shutil.which
  monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "ip" else
                      real_which(tool))
  assert "iproute2" in netns.check_supported("tun")
  with pytest.raises(netns.NetnsError, match="not possible here: iproute2"):
    netns.require_supported()
  with pytest.raises(ValueError, match="shaper"):
    netns.check_supported("wire")


# -- pure: the userspace shaper's schedule -------------------------------------------------------


def test_direction_delays_keeps_order_and_drops():
  rng = random.Random(0)
  plain = link_shaper.Direction(out_fd=-1, delay_s=0.007)
  assert plain.schedule(10.0, rng) == pytest.approx(10.007)
  jittery = link_shaper.Direction(out_fd=-1, delay_s=0.007, jitter_s=0.003)
  dues = [jittery.schedule(10.0 + k * 1e-4, rng) for k in range(2000)]
  assert dues == sorted(dues)  # jitter never reorders a direction
  assert all(due >= 10.0 + k * 1e-4 + 0.004 - 1e-12 for k, due in enumerate(dues))
  spread = [jittery.schedule(20.0 + k, rng) - (20.0 + k) for k in range(2000)]  # spaced apart
  assert min(spread) >= 0.004 - 1e-12 and max(spread) <= 0.010 + 1e-12
  assert statistics.mean(spread) == pytest.approx(0.007, abs=2e-4)
  lossy = link_shaper.Direction(out_fd=-1, delay_s=0.001, loss=0.25)
  lost = sum(lossy.schedule(30.0 + k, rng) is None for k in range(4000))
  assert 850 < lost < 1150
  early = link_shaper.Direction(out_fd=-1, delay_s=0.001, jitter_s=0.005)
  assert all(early.schedule(40.0 + k, rng) >= 40.0 + k for k in range(500))  # never before now


# -- pure: the main job's plumbing under --netns -------------------------------------------------


def test_child_argvs_run_each_child_in_its_namespace(tmp_path):
  topology = netns.NetnsTopology(2, tag=TAG)
  options = local.LocalOptions(out_dir=str(tmp_path), netns=netns.NetnsConfig())
  argvs = local.child_argvs(options, 2, config_path="run/config.json", port=netns.SERVER_PORT,
                            server_security=["--allow_insecure"],
                            drafter_security=[["--allow_insecure"]] * 2, topology=topology)
  verifier = argvs["verifier"]
  assert verifier[:4] == topology.server_prefix
  assert verifier[5:7] == ["-m", "launch.verifier"]
  assert "--host=10.213.0.1" in verifier and "--port=50051" in verifier
  for i in range(2):
    drafter = argvs[f"drafter{i}"]
    assert drafter[:4] == topology.drafter_prefix(i)
    assert "--server=10.213.0.1:50051" in drafter and f"--client_index={i}" in drafter
  plain = local.child_argvs(options, 2, config_path="run/config.json", port=4321,
                            server_security=["--allow_insecure"],
                            drafter_security=[["--allow_insecure"]] * 2)
  assert plain["verifier"][1:3] == ["-m", "launch.verifier"]
  assert "--host=127.0.0.1" in plain["verifier"]
  assert "--server=127.0.0.1:4321" in plain["drafter1"]
  holder = local.holder_argv("10.213.0.1", 50051, ["--allow_insecure"])
  assert holder[0] == sys.executable and holder[-4:] == ["10.213.0.1", "50051", str(os.getpid()),
                                                         "--allow_insecure"]


def test_the_server_certificate_names_the_namespace_address(tmp_path):
  from cryptography import x509  # pylint: disable=g-import-not-at-top

  security_flags = local._security_flags  # pylint: disable=protected-access
  server_flags, _ = security_flags(str(tmp_path), 2, False, host="10.213.0.1")
  cert_path = dict(f[2:].split("=", 1) for f in server_flags)["tls_cert"]
  with open(cert_path, "rb") as f:
    cert = x509.load_pem_x509_certificate(f.read())
  names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
  assert {str(a) for a in names.get_values_for_type(x509.IPAddress)} == {"10.213.0.1",
                                                                        "127.0.0.1"}


def test_serve_mode_is_refused_in_namespaces():
  with pytest.raises(ValueError, match="serve mode does not run in network namespaces"):
    local.LocalOptions(out_dir="x", serve=True, netns=netns.NetnsConfig())


def test_launcher_refuses_rtts_that_do_not_match_the_drafters(tmp_path):
  out_dir = tmp_path / "run"
  done = subprocess.run([sys.executable, "-m", "launch.local", "--netns", "--netns_rtts=5,14,40",
                         "--config.edge.num_drafters=2", f"--out_dir={out_dir}"],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 1
  assert "--netns: 3 per-drafter RTTs (5, 14, 40 ms) for 2 drafters" in done.stdout
  assert "Traceback" not in done.stdout + done.stderr
  assert not out_dir.exists()  # refused before anything was written


def test_launcher_names_why_the_machine_does_not_allow_it(tmp_path):
  shaper = next((s for s in ("netem", "tun") if netns.check_supported(s) is not None), None)
  if shaper is None:
    pytest.skip("this machine supports every shaper: no refusal to show")
  done = subprocess.run([sys.executable, "-m", "launch.local", "--netns",
                         f"--netns_shaper={shaper}", f"--out_dir={tmp_path / 'run'}"],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 1
  assert "--netns: network namespaces with shaped links are not possible here: " in done.stdout
  assert netns.check_supported(shaper) in done.stdout
  assert "Traceback" not in done.stdout + done.stderr
  assert not (tmp_path / "run").exists()


# -- live: real namespaces -----------------------------------------------------------------------

_ECHO_SERVER = """
import socket, sys, threading
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], 7000))
server.listen()
print("listening", flush=True)
def echo(connection):
  connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
  while data := connection.recv(64):
    connection.sendall(data)
while True:
  threading.Thread(target=echo, args=(server.accept()[0],), daemon=True).start()
"""

# One byte there and back per sample, Nagle off: one sample is one round trip.
_ECHO_CLIENT = """
import json, socket, sys, time
connection = socket.create_connection((sys.argv[1], 7000), timeout=10)
connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
samples = []
for _ in range(int(sys.argv[2])):
  started = time.perf_counter()
  connection.sendall(b"x")
  connection.recv(1)
  samples.append((time.perf_counter() - started) * 1000)
print(json.dumps(samples))
"""


def _echo_rtts_ms(topology: netns.NetnsTopology, samples: int = 20) -> list[list[float]]:
  """Each drafter's round trips to a TCP echo server in the server namespace."""
  server = subprocess.Popen([*topology.server_prefix, sys.executable, "-c", _ECHO_SERVER,
                             topology.server_address], stdout=subprocess.PIPE, text=True)
  try:
    assert server.stdout.readline().strip() == "listening"
    measured = []
    for i in range(topology.num_drafters):
      done = subprocess.run([*topology.drafter_prefix(i), sys.executable, "-c", _ECHO_CLIENT,
                             topology.server_address, str(samples)],
                            capture_output=True, text=True, timeout=60, check=True)
      measured.append(json.loads(done.stdout)[1:])  # the first also paid for the connection
    return measured
  finally:
    server.kill()
    server.wait()


def _ours(topology: netns.NetnsTopology) -> list[str]:
  return [name for name in netns.list_namespaces() if topology.tag in name]


@pytest.mark.parametrize("shaper", ["netem", "tun"])
def test_links_have_the_configured_rtt(shaper):
  _live(shaper)
  config = netns.NetnsConfig(rtt_ms=14.0, jitter_ms=1.0, loss_pct=0.0, drafter_rtts_ms=(6., 30.),
                             shaper=shaper)
  with netns.NetnsTopology(2, config) as topology:
    assert sorted(_ours(topology)) == sorted(topology.namespaces)
    measured = _echo_rtts_ms(topology)
  assert _ours(topology) == []
  for rtt, samples in zip(config.drafter_rtts_ms, measured):
    median = statistics.median(samples)
    # Jitter is +-1 ms each way; the upper bound leaves room for a busy machine's wake-ups.
    assert 0.8 * rtt <= median <= 1.2 * rtt + 3.0, (rtt, sorted(samples))


def test_veth_star_connects_without_netem():
  """The netem topology's links on a kernel that may lack sch_netem: the same commands, tc
  left out, connect every drafter to the verifier's address."""
  _live("tun")  # namespaces work here; veth pairs are probed below
  topology = netns.NetnsTopology(2, netns.NetnsConfig(shaper="netem"))
  try:
    for argv in topology.namespace_commands():
      subprocess.run(argv, check=True, capture_output=True)
    for argv in topology.link_commands("netem"):
      if argv[0] != "tc":
        subprocess.run(argv, check=True, capture_output=True)
    measured = _echo_rtts_ms(topology, samples=3)
  finally:
    topology.close()
  assert len(measured) == 2 and all(len(samples) == 2 for samples in measured)
  assert _ours(topology) == []


def test_teardown_on_error_and_of_left_overs():
  _live()
  topology = netns.NetnsTopology(2, netns.NetnsConfig(rtt_ms=2.0))
  with pytest.raises(RuntimeError, match="inside"), topology:
    assert len(_ours(topology)) == 3
    raise RuntimeError("inside")
  assert _ours(topology) == []
  tuns = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                        check=True).stdout
  assert not any(name in tuns for i in range(2) for name in topology.tun_names(i))
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  left, alive = f"sej-{gone.pid}-0a0b0c-server", f"sej-{os.getpid()}-0a0b0c-server"
  for name in (left, alive):
    subprocess.run(["ip", "netns", "add", name], check=True)
  try:
    assert netns.cleanup_stale() == [left]
    assert alive in netns.list_namespaces() and left not in netns.list_namespaces()
  finally:
    for name in (left, alive):
      subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.mark.slow
@pytest.mark.heavy  # ~50 s: the main job in network namespaces (needs root)
def test_main_job_over_real_links_matches_target_only_decoding(served_pair_dirs,
                                                               compilation_cache, tmp_path):
  """Two drafters at 6 and 30 ms RTT, mutual TLS to the verifier's namespace address, the
  default jitter and loss: greedy outputs equal the target-only baseline's, and each drafter's
  rounds spend its link's RTT on the network."""
  _live()
  rtts = (6.0, 30.0)
  out_dir = tmp_path / "run"
  argv = local_argv(served_pair_dirs, out_dir, compilation_cache, "--netns",
                    f"--netns_rtts={','.join(f'{r:g}' for r in rtts)}",
                    "--baselines=autoregressive")
  launcher = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
  try:
    stdout, _ = launcher.communicate(timeout=600)
  finally:
    if launcher.poll() is None:
      launcher.kill()
  assert launcher.returncode == 0, stdout[-4000:]
  assert "edge.simulated_rtt_ms set to 0: the RTT is real" in stdout
  assert "verifier serving on 10.213.0.1:50051" in stdout
  assert json.loads((out_dir / "config.json").read_text())["edge"]["simulated_rtt_ms"] == 0.0
  assert not [n for n in netns.list_namespaces() if n.startswith(f"sej-{launcher.pid}-")]

  outputs, network_ms = {}, {}
  for name in ("drafter0.jsonl", "drafter1.jsonl", "server_only_ar.jsonl"):
    for line in (out_dir / name).read_text().splitlines():
      event = json.loads(line)
      if event["kind"] == "request_end":
        outputs.setdefault(event["run_id"], {})[event["request_id"]] = event["output_tokens"]
      elif event["kind"] == "request_step" and event.get("phase") == "verify":
        # The edge's wait for a round less the verifier's own time: the network's share.
        network_ms.setdefault(event["client_id"], []).append(1000 * (
            event["wait_time_s"] - event["server_queue_time_s"] - event["server_forward_time_s"]))
  assert len(outputs["specedge"]) == 6
  assert outputs["specedge"] == outputs["server_only_ar"]
  means = {client: statistics.mean(times) for client, times in network_ms.items()}
  assert set(means) == {"edge0", "edge1"}, means
  for client, rtt in zip(("edge0", "edge1"), rtts):
    assert means[client] >= 0.8 * rtt, means
  assert means["edge1"] - means["edge0"] >= 0.5 * (rtts[1] - rtts[0]), means
