"""The main job end to end: `python -m launch.local` starts a verifier and two drafter processes,
then the autoregressive baseline, on a tiny target/draft pair with a trained tokenizer and the
embedded prompt set. Also: Ctrl-C leaves no process behind, and the process plumbing itself."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import psutil
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from specedge_jax.serving import local, processes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def local_argv(served_pair_dirs, out_dir, cache_dir, *extra):
  return [sys.executable, "-m", "launch.local",
          f"--config.models.target={served_pair_dirs['target']}",
          f"--config.models.draft={served_pair_dirs['draft']}",
          "--config.tree.max_n_beams=4", "--config.tree.max_beam_len=3",
          "--config.tree.max_branch_width=4", "--config.tree.max_budget=12",
          "--config.proactive.mode=disabled",
          "--config.server.max_batch_size=2", "--config.server.num_slots=4",
          "--config.edge.num_drafters=2", "--config.edge.requests_per_drafter=2",
          "--config.edge.simulated_rtt_ms=2",
          "--config.workload.num_requests=6", "--config.workload.max_new_tokens=10",
          f"--out_dir={out_dir}", f"--compilation_cache_dir={cache_dir}", *extra]


@pytest.mark.slow
def test_local_main_job_matches_the_target_only_baseline(served_pair_dirs, compilation_cache,
                                                         tmp_path):
  out_dir = tmp_path / "run"
  done = subprocess.run(local_argv(served_pair_dirs, out_dir, compilation_cache,
                                   "--baselines=autoregressive"),
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  for heading in ("Run summary", "throughput (tok/s wall)", "ITL p50 / p99",
                  "tokens per step (bonus incl.)", "specedge", "server_only_ar"):
    assert heading in done.stdout, done.stdout
  summaries = {s["run"]: s for s in json.loads((out_dir / "summary.json").read_text())}
  assert set(summaries) == {"specedge", "server_only_ar"}
  spec, baseline = summaries["specedge"], summaries["server_only_ar"]
  assert spec["requests"]["n_requests"] == baseline["requests"]["n_requests"] == 6
  assert spec["generated_tokens"] == baseline["generated_tokens"] == 60
  assert spec["n_clients"] == 2 and spec["n_edges"] == 2
  assert spec["requests"]["mean_tokens_per_step"] > 1.0  # speculation did accept tokens
  # Greedy SpecEdge across three processes emits exactly the target-only tokens.
  outputs = {}
  for name in ("drafter0.jsonl", "drafter1.jsonl", "server_only_ar.jsonl"):
    for line in (out_dir / name).read_text().splitlines():
      event = json.loads(line)
      if event["kind"] == "request_end":
        outputs.setdefault(event["run_id"], {})[event["request_id"]] = event["output_tokens"]
  assert len(outputs["specedge"]) == 6
  assert outputs["specedge"] == outputs["server_only_ar"]
  # Every verify batch the verifier logged served one or two trees (max_batch_size=2).
  batches = [json.loads(line) for line in (out_dir / "verifier.jsonl").read_text().splitlines()]
  sizes = {b["batch_size"] for b in batches if b["op"] == "verify"}
  assert sizes and sizes <= {1, 2}


def _children_of_run(out_dir: str) -> list[psutil.Process]:
  found = []
  for process in psutil.process_iter(["cmdline"]):
    try:
      if any(out_dir in part for part in (process.info["cmdline"] or [])):
        found.append(process)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
      pass
  return found


@pytest.mark.slow
def test_ctrl_c_stops_every_child(served_pair_dirs, compilation_cache, tmp_path):
  out_dir = str(tmp_path / "interrupted")
  # SIGINT as a terminal's Ctrl-C: a suite run in the background hands its children SIGINT
  # ignored (see the serve-mode test in test_openai_endpoint.py).
  launcher = subprocess.Popen(local_argv(served_pair_dirs, out_dir, compilation_cache,
                                         "--config.workload.max_new_tokens=40"),
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  try:
    deadline = time.monotonic() + 300
    # Interrupt once the drafters run (their logs exist), i.e. with all children alive.
    while not os.path.exists(os.path.join(out_dir, "drafter1.log")):
      assert launcher.poll() is None, launcher.stdout.read()
      assert time.monotonic() < deadline, "the cluster did not start"
      time.sleep(0.2)
    assert len(_children_of_run(out_dir)) >= 4  # launcher, verifier, two drafters
    launcher.send_signal(signal.SIGINT)
    launcher.wait(60)
  finally:
    if launcher.poll() is None:
      launcher.kill()
  deadline = time.monotonic() + 15
  while _children_of_run(out_dir) and time.monotonic() < deadline:
    time.sleep(0.2)
  assert _children_of_run(out_dir) == []


def test_parse_cpus():
  assert processes.parse_cpus("") == ()
  assert processes.parse_cpus("0") == (0,)
  assert processes.parse_cpus("0,2-4") == (0, 2, 3, 4)
  for bad in ("a", "3-1", "-1", "1-x"):
    with pytest.raises(ValueError, match="cpu"):
      processes.parse_cpus(bad)


def test_a_child_exits_when_its_parent_is_killed(tmp_path):
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  watcher = subprocess.Popen([sys.executable, "-c", (
      "import time; from specedge_jax.serving import processes; "
      f"processes.exit_with_parent({sleeper.pid}, poll_s=0.05); time.sleep(120)")],
                             cwd=REPO_ROOT)
  try:
    time.sleep(1.0)
    assert watcher.poll() is None
    sleeper.kill()
    sleeper.wait()
    assert watcher.wait(10) != 0  # ended by its SIGTERM
  finally:
    for process in (sleeper, watcher):
      if process.poll() is None:
        process.kill()


def test_child_processes_kill_whole_groups(tmp_path):
  children = processes.ChildProcesses()
  child = children.start("shell", ["bash", "-c", "sleep 120 & sleep 120 & wait"],
                         str(tmp_path / "shell.log"))
  time.sleep(0.5)
  group = [p for p in psutil.process_iter() if _pgid(p) == child.pid]
  assert len(group) == 3  # bash and its two sleeps
  children.kill_all()
  time.sleep(0.2)
  assert not [p for p in group if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _pgid(process: psutil.Process) -> int | None:
  try:
    return os.getpgid(process.pid)
  except (ProcessLookupError, PermissionError):
    return None



def test_port_holder_hands_waiting_drafters_over_to_the_verifier():
  """A drafter ready before the verifier waits on the holder's NOT_SERVING health, not on a
  closed port (where gRPC's reconnect backoff would delay it by seconds), and reaches the
  verifier, bound beside the holder on the same port, as soon as the holder is released."""
  # Imported here: runners loads JAX, which the other tests of this file do not need.
  from specedge_jax.serving import runners  # pylint: disable=g-import-not-at-top

  holder = local._PortHolder("127.0.0.1", None)  # pylint: disable=protected-access

  async def handover_s() -> float:
    waiting = asyncio.create_task(runners.wait_for_server(f"127.0.0.1:{holder.port}", 20.0))
    await asyncio.sleep(2.5)  # past a first reconnect backoff, were the port closed
    assert not waiting.done()  # NOT_SERVING: still waiting
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set(local.SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    assert server.add_insecure_port(f"127.0.0.1:{holder.port}") == holder.port  # SO_REUSEPORT
    await server.start()
    started = time.monotonic()
    holder.release()
    await asyncio.wait_for(waiting, 10.0)
    took = time.monotonic() - started
    await server.stop(None)
    return took

  try:
    assert asyncio.run(handover_s()) < 0.8
  finally:
    holder.release()
