"""Measurements on this machine that feed the simulator's CPU curves (the logic behind
`launch/simulate.py --calibrate`).

What this module owns: four measurements and the file they write. Each side of a SpecEdge round
is measured against a fake of the other side, never against the sweep it is then used to
predict; the sweep's own timings are not read here.

1. `measure_grpc_round`: a real `VerifierServer` over a fake engine in a child process on one
   core and a real `Drafter` over a fake draft engine in this process on the other, over
   loopback with mutual TLS and bearer tokens (as `launch.local` runs them), RTT 0: per round,
   the edge's measured wait less the server's queue and forward (the overhead), and the CPU
   seconds each side spent per round.
2. `measure_served_verify`: the same, with the real verifier (its engine from a serving config:
   the sweep's own `config.json`) and B sessions for B = 1..8: the forward time the verifier
   reports per batch size, and the round overhead, as served. The served forward is 1.5-2.5 ms
   above the bare engine call (3.): measured, not explained further here.
3. `measure_served_draft`: 1, 2, 4 real drafter processes (the real draft engine, K = 2,
   simulated RTT) pinned to one core, against a fake verifier: the draft time per round, and
   each drafter process's CPU seconds per round in all (device, event loop, gRPC threads), whose
   growth with drafters per core is the sharing inflation.
4. `measure_engines`: the serving engines themselves, in process, pinned like the sweep's
   processes: the target's `verify` and `decode` per batch size, its prefill per prompt length,
   the draft engine's `draft` (per depth limit where it takes limits), `commit` and `open`, as
   CPU seconds of the pinned process (`_Timer` says why), wall times beside them.

Other work on this machine (other sessions' processes, invisible to ps) comes and goes; every
wall-clock figure is the least disturbed of several passes. All go into one JSON (`write`),
read back by `costs.cost_model_from_calibration`. JAX, gRPC and the serving stack are imported
inside the functions only: the simulator itself needs none. This module measures; it never
changes an engine, the server or a config.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import os
import statistics
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np

FORMAT = "specedge-sim-calibration"


def _median_ms(seconds: Sequence[float]) -> float:
  return 1000.0 * float(statistics.median(seconds))


class _Timer:
  """Wall and CPU seconds of the calls it times. The CPU seconds of a process pinned to one core
  are what a call costs on a core of its own: other work on the machine (here: other sessions'
  processes, invisible to ps, took up to half of the cores) stretches the wall time of a call, not
  its CPU time. The figures used are the CPU ones; the wall ones are kept beside them."""

  def __init__(self):
    self.wall: list[float] = []
    self.cpu: list[float] = []

  def __call__(self, fn, *args):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    self.cpu.append(time.process_time() - c)
    self.wall.append(time.perf_counter() - w)
    return out

  def median_ms(self) -> float:
    return _median_ms(self.cpu)

  def wall_median_ms(self) -> float:
    return _median_ms(self.wall)


def _machine() -> dict[str, Any]:
  return {"cpus": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
          "load_average": list(os.getloadavg())}


def measure_engines(config, *, rounds: int = 12, passes: int = 3, prefill_prompts: int = 24,
                    on_line: Callable[[str], None] = print) -> dict[str, Any]:
  """The serving engines' own times on this machine (module docstring, 1). The caller pins the
  process first (`processes.pin_to_cpus`, before JAX starts its threads)."""
  from specedge_jax import api  # pylint: disable=g-import-not-at-top (JAX loads here only)
  from specedge_jax.serving import runners, workload

  started = time.perf_counter()
  target = runners.build_target_engine(config)
  draft = runners.build_draft_engine(config, num_slots=config.server.max_batch_size)
  on_line(f"engines built and warmed up in {time.perf_counter() - started:.1f} s")
  requests = workload.load_requests(config)
  prompts = [tuple(r.prompt_ids) for r in requests]
  sampling = api.SamplingParams()
  room = config.server.max_len - max(len(p) for p in prompts) - config.max_tree_nodes - 1
  out: dict[str, Any] = {"machine_before": _machine(), "rounds": rounds, "passes": passes}

  # Prefill: the target's open (chunked prefill + first token) and the draft's open.
  prefill_points, draft_open = [], _Timer()
  for prompt in prompts[:prefill_prompts]:
    timer = _Timer()
    slot, first, _ = timer(target.open, prompt, sampling, 0, room)
    draft_slot = draft_open(draft.open, prompt, first)
    prefill_points.append((len(prompt), timer.median_ms(), timer.wall_median_ms()))
    target.close(slot)
    draft.close(draft_slot)
  out["prefill"] = {"points": [(tokens, ms) for tokens, ms, _ in prefill_points],
                    "wall_points": [(tokens, wall) for tokens, _, wall in prefill_points]}
  on_line(f"prefill: {len(prefill_points)} prompts, median "
          f"{statistics.median(ms for _, ms, _ in prefill_points):.2f} ms CPU "
          f"({statistics.median(w for _, _, w in prefill_points):.2f} ms wall)")

  next_prompt = iter(range(10**9))

  def open_pair() -> tuple[int, int]:
    while True:  # a prompt whose first token ends it cannot be verified: take the next one
      prompt = prompts[next(next_prompt) % len(prompts)]
      slot, first, finished = target.open(prompt, sampling, 0, room)
      if not finished:
        return slot, draft.open(prompt, first)
      target.close(slot)

  # Passes over every batch size, alternating, each pass's median kept; the figure used is the
  # least disturbed pass (as bench_core takes the best of alternating passes).
  verify_passes: dict[int, list[_Timer]] = {}
  decode_passes: dict[int, list[_Timer]] = {}
  drafts, commits = _Timer(), _Timer()
  for _ in range(passes):
    for batch in range(1, config.server.max_batch_size + 1):
      pairs = [open_pair() for _ in range(batch)]
      verify_timer, decode_timer = _Timer(), _Timer()
      for _ in range(rounds):
        trees = [drafts(draft.draft, draft_slot) for _, draft_slot in pairs]
        results = verify_timer(target.verify,
                               [(slot, tree) for (slot, _), tree in zip(pairs, trees)])
        for i, ((slot, draft_slot), result) in enumerate(zip(pairs, results)):
          commits(draft.commit, draft_slot, result)
          if result.finished:  # keep the batch full with the next prompt
            target.close(slot)
            draft.close(draft_slot)
            pairs[i] = open_pair()
      verify_passes.setdefault(batch, []).append(verify_timer)
      for _ in range(rounds):
        results = decode_timer(target.decode, [slot for slot, _ in pairs])
        if any(r.finished for r in results):
          break
      decode_passes.setdefault(batch, []).append(decode_timer)
      for slot, draft_slot in pairs:
        target.close(slot)
        draft.close(draft_slot)

  def rows(passes_by_batch, tree_tokens):
    return [{"batch_size": b, "tree_tokens": tree_tokens,
             "median_ms": min(t.median_ms() for t in timers),
             "wall_median_ms": min(t.wall_median_ms() for t in timers),
             "pass_medians_ms": [t.median_ms() for t in timers],
             "pass_wall_medians_ms": [t.wall_median_ms() for t in timers]}
            for b, timers in passes_by_batch.items()]

  out["verify"] = rows(verify_passes, config.max_tree_nodes)
  out["decode"] = rows(decode_passes, 1)
  for v, d in zip(out["verify"], out["decode"]):
    on_line(f"B={v['batch_size']}: verify {v['median_ms']:.2f} ms CPU ({v['wall_median_ms']:.2f} "
            f"wall), decode {d['median_ms']:.2f} ms CPU ({d['wall_median_ms']:.2f} wall)")

  # The draft per depth limit (the speculation controller's knob), one session at a time. An
  # engine from before the controller takes no limits: only its full-depth draft is timed.
  per_depth = []
  slot, draft_slot = open_pair()
  for depth in range(1, config.tree.max_beam_len + 1):
    timer = _Timer()
    for _ in range(rounds):
      try:
        tree = timer(draft.draft, draft_slot, api.TreeLimits(budget=config.tree.max_budget,
                                                             depth=depth))
      except (TypeError, AttributeError):
        timer = None
        break
      result = target.verify([(slot, tree)])[0]
      draft.commit(draft_slot, result)
      if result.finished:
        target.close(slot)
        draft.close(draft_slot)
        slot, draft_slot = open_pair()
    if timer is None:
      break
    per_depth.append({"depth": depth, "median_ms": timer.median_ms(),
                      "wall_median_ms": timer.wall_median_ms()})
  target.close(slot)
  draft.close(draft_slot)
  out["draft"] = {"per_depth": per_depth, "draft_median_ms": drafts.median_ms(),
                  "draft_wall_median_ms": drafts.wall_median_ms(),
                  "commit_median_ms": commits.median_ms(),
                  "commit_wall_median_ms": commits.wall_median_ms(),
                  "open_median_ms": draft_open.median_ms()}
  on_line(f"draft {drafts.median_ms():.2f} ms CPU ({drafts.wall_median_ms():.2f} wall; per "
          "depth: " +
          (", ".join(f"{p['depth']}: {p['median_ms']:.2f}" for p in per_depth) or "no limits") +
          f"), commit {commits.median_ms():.2f} ms, open {draft_open.median_ms():.2f} ms")
  out["machine_after"] = _machine()
  return out


# ----------------------------------------------------------------------------------------------
# Served: each side of a round measured against a fake of the other, over gRPC on loopback


def _pki(folder: str) -> dict[str, Any]:
  from specedge_jax.serving import security  # pylint: disable=g-import-not-at-top

  pki = security.make_test_pki(folder)
  pki["tokens_file"] = security.make_tokens(folder, ["edge0"])
  pki["token"] = security.read_token_file(security.token_file(folder, "edge0"))
  return pki


def _server_child(cpus: Sequence[int], pki: dict[str, Any], config_json: str | None, queue,
                  stop, vocab_size: int) -> None:
  """A child process: a real VerifierServer (mutual TLS, tokens, static batching up to 8) over
  the real target engine of `config_json`, or over a fake engine (of `vocab_size`: its tokens
  must be the real draft's) when it is None."""
  from specedge_jax.serving import processes, security  # pylint: disable=g-import-not-at-top
  from specedge_jax.serving.serving_config import BatchingConfig, ServingConfig
  from specedge_jax.serving.verifier import VerifierServer

  if cpus:
    processes.pin_to_cpus(cpus)  # before JAX starts its threads
  if config_json is None:
    from specedge_jax.testing.fakes import FakeTargetEngine

    engine = FakeTargetEngine(vocab_size=vocab_size, num_slots=8, max_len=4096,
                              max_batch_size=8)
  else:
    from specedge_jax.serving import runners

    engine = runners.build_target_engine(ServingConfig.load_json(config_json))

  async def main() -> None:
    server = VerifierServer(
        engine, batching=BatchingConfig(mode="static", static_timeout_s=5.0),
        eos_token_ids=(), security=security.ServerSecurity(
            cert_file=pki["server_cert"], key_file=pki["server_key"],
            client_ca_file=pki["ca_cert"], tokens_file=pki["tokens_file"]))
    port = await server.start("127.0.0.1:0")
    cpu0 = time.process_time()
    queue.put(port)
    while not stop.is_set():
      await asyncio.sleep(0.05)
    queue.put(time.process_time() - cpu0)
    await server.stop(grace=None)

  asyncio.run(main())


def _client_security(pki: dict[str, Any]):
  from specedge_jax.serving import security  # pylint: disable=g-import-not-at-top

  return security.ClientSecurity(ca_file=pki["ca_cert"], cert_file=pki["client_cert"],
                                 key_file=pki["client_key"], token=pki["token"])


async def _drive(port: int, pki: dict[str, Any], engine, requests, *, concurrent: int,
                 max_new_tokens: int, rtt_ms: float) -> tuple[list[dict], float]:
  """One Drafter over `engine` serving `requests` against the server on `port`: its events and
  its process's CPU seconds."""
  from specedge_jax.measure.events import EventLog  # pylint: disable=g-import-not-at-top
  from specedge_jax.serving import runners, security
  from specedge_jax.serving.drafter import Drafter, DrafterConfig

  client = _client_security(pki)
  address = f"127.0.0.1:{port}"
  await runners.wait_for_server(address, 120.0, client)
  channel = security.open_channel(address, client)
  log = EventLog(None, "specedge")
  drafter = Drafter(engine, channel, DrafterConfig(
      client_id="edge0", max_concurrent_requests=concurrent, max_new_tokens=max_new_tokens,
      simulated_rtt_ms=rtt_ms), event_log=log)
  cpu0 = time.process_time()
  await drafter.run(requests)
  cpu = time.process_time() - cpu0
  await channel.close()
  return list(log.events or ()), cpu


def _start_server(cpus, pki, config_json, vocab_size: int = 50):
  context = multiprocessing.get_context("spawn")
  queue, stop = context.Queue(), context.Event()
  child = context.Process(target=_server_child, args=(tuple(cpus), pki, config_json, queue,
                                                      stop, vocab_size), daemon=True)
  child.start()
  deadline = time.monotonic() + 600
  while True:  # a child that died (an import error, a bad config) must not cost the timeout
    try:
      return child, queue, stop, queue.get(timeout=1.0)
    except Exception:  # pylint: disable=broad-except (queue.Empty)
      if not child.is_alive() or time.monotonic() > deadline:
        raise RuntimeError(f"the measured server did not come up (exit code {child.exitcode})")


def _stop_server(child, queue, stop) -> float:
  stop.set()
  try:
    cpu = float(queue.get(timeout=30))
  except Exception:  # pylint: disable=broad-except (the figure is then missing, not wrong)
    cpu = float("nan")
  child.join(timeout=30)
  if child.is_alive():
    child.terminate()
  return cpu


def _rounds(events: Sequence[dict]) -> list[dict]:
  return [e for e in events if e["kind"] == "request_step" and e.get("phase") == "verify"]


def _overheads(rounds: Sequence[dict], rtt_ms: float) -> list[float]:
  return [e["wait_time_s"] - e["server_queue_time_s"] - e["server_forward_time_s"] -
          rtt_ms / 1000.0 for e in rounds]


def measure_grpc_round(*, server_cpus: Sequence[int] = (0,), client_cpus: Sequence[int] = (1,),
                       num_requests: int = 48, max_new_tokens: int = 64, concurrent: int = 2,
                       correct_depth: int = 3, on_line: Callable[[str], None] = print
                       ) -> dict[str, Any]:
  """The Verify round's cost outside the engines and the RTT, both sides fakes (module
  docstring, 2)."""
  from specedge_jax.serving import processes  # pylint: disable=g-import-not-at-top
  from specedge_jax.serving.drafter import EdgeRequest
  from specedge_jax.testing.fakes import FakeDraftEngine

  pki = _pki(tempfile.mkdtemp(prefix="sim-grpc-"))
  child, queue, stop, port = _start_server(server_cpus, pki, None)
  affinity = os.sched_getaffinity(0)
  try:
    if client_cpus:
      processes.pin_to_cpus(client_cpus)
    requests = [EdgeRequest(request_id=f"r{i}", prompt_ids=(1 + i % 7, 2, 3))
                for i in range(num_requests)]
    events, client_cpu = asyncio.run(_drive(
        port, pki, FakeDraftEngine(num_slots=concurrent, correct_depth=correct_depth), requests,
        concurrent=concurrent, max_new_tokens=max_new_tokens, rtt_ms=0.0))
  finally:
    os.sched_setaffinity(0, affinity)  # the caller pins what comes next itself
    server_cpu = _stop_server(child, queue, stop)
  rounds = _rounds(events)
  overhead = _overheads(rounds, 0.0)
  result = {
      "rounds": len(rounds), "concurrent": concurrent, "transport": "mutual TLS + bearer token",
      "tree_nodes": 2 * correct_depth + 2, "server_cpus": list(server_cpus),
      "client_cpus": list(client_cpus),
      "round_overhead_median_ms": _median_ms(overhead),
      "round_overhead_mean_ms": 1000.0 * float(np.mean(overhead)),
      "round_overhead_p90_ms": 1000.0 * float(np.percentile(overhead, 90)),
      "client_cpu_ms_per_round": 1000.0 * client_cpu / max(len(rounds), 1),
      "server_cpu_ms_per_round": 1000.0 * server_cpu / max(len(rounds), 1),
      "machine": _machine(),
  }
  on_line(f"gRPC round on loopback ({result['transport']}, K={concurrent}, fakes on both sides): "
          f"overhead median {result['round_overhead_median_ms']:.2f} ms, mean "
          f"{result['round_overhead_mean_ms']:.2f} ms over {len(rounds)} rounds; CPU per round: "
          f"client {result['client_cpu_ms_per_round']:.2f} ms, server "
          f"{result['server_cpu_ms_per_round']:.2f} ms")
  return result


def measure_served_verify(config_json: str, *, server_cpus: Sequence[int] = (0,),
                          client_cpus: Sequence[int] = (1,), max_batch_size: int = 8,
                          requests_per_session: int = 2, max_new_tokens: int = 48,
                          rtt_ms: float = 14.0, passes: int = 3,
                          on_line: Callable[[str], None] = print
                          ) -> dict[str, Any]:
  """The target's verify as the verifier serves it: the real verifier (its engine from
  `config_json`) in a child process on `server_cpus`, driven by a Drafter over a fake draft
  engine on `client_cpus` with B sessions at once for B = 1..max_batch_size (static batching:
  every batch holds all B), in `passes` passes. Per B: the forward time the server reports, and
  the round's overhead outside queue, forward and RTT (each the least disturbed pass's median).
  """
  from specedge_jax.serving import (
    processes,  # pylint: disable=g-import-not-at-top
    workload,
  )
  from specedge_jax.serving.drafter import EdgeRequest
  from specedge_jax.serving.serving_config import ServingConfig
  from specedge_jax.testing.fakes import FakeDraftEngine

  config = ServingConfig.load_json(config_json)
  prompts = [tuple(r.prompt_ids) for r in workload.load_requests(config)]
  pki = _pki(tempfile.mkdtemp(prefix="sim-served-"))
  started = time.perf_counter()
  child, queue, stop, port = _start_server(server_cpus, pki, config_json)
  on_line(f"served verify: verifier up in {time.perf_counter() - started:.0f} s")
  affinity = os.sched_getaffinity(0)
  forward: dict[int, list[float]] = {}
  overhead: dict[int, list[float]] = {}
  try:
    if client_cpus:
      processes.pin_to_cpus(client_cpus)
    for repeat in range(passes):
      for batch in range(1, max_batch_size + 1):
        requests = [EdgeRequest(request_id=f"p{repeat}-b{batch}-{i}",
                                prompt_ids=prompts[i % len(prompts)])
                    for i in range(batch * requests_per_session)]
        # The fake's trees have 2 x 3 + 2 = 8 nodes; the engine pads every tree to its capacity
        # (the embedded tree's 9), so the forward is the one of the real trees.
        engine = FakeDraftEngine(num_slots=batch, correct_depth=3)
        events, _ = asyncio.run(_drive(port, pki, engine, requests, concurrent=batch,
                                       max_new_tokens=max_new_tokens, rtt_ms=rtt_ms))
        rounds = [e for e in _rounds(events) if e["server_batch_size"] == batch]
        forward.setdefault(batch, []).append(_median_ms([e["server_forward_time_s"]
                                                         for e in rounds]))
        overhead.setdefault(batch, []).append(_median_ms(_overheads(rounds, rtt_ms)))
  finally:
    os.sched_setaffinity(0, affinity)
    _stop_server(child, queue, stop)
  # Other work on the machine only ever stretches a pass: the least disturbed one is kept.
  rows = [{"batch_size": b, "tree_tokens": config.max_tree_nodes, "median_ms": min(forward[b]),
           "round_overhead_median_ms": min(overhead[b]), "pass_medians_ms": forward[b],
           "pass_overheads_ms": overhead[b]} for b in sorted(forward)]
  for row in rows:
    on_line(f"served verify B={row['batch_size']}: forward {row['median_ms']:.2f} ms, round "
            f"overhead {row['round_overhead_median_ms']:.2f} ms (passes: "
            f"{', '.join(f'{x:.1f}' for x in row['pass_medians_ms'])})")
  return {"rows": rows, "rtt_ms": rtt_ms, "server_cpus": list(server_cpus),
          "client_cpus": list(client_cpus), "machine": _machine()}


def _drafter_child(index: int, cpus: Sequence[int], pki: dict[str, Any], config_json: str,
                   port: int, concurrent: int, num_requests: int, rtt_ms: float, queue, warm,
                   ready) -> None:
  """A child process: the real draft engine of `config_json` in a Drafter (K = `concurrent`);
  reports warm (`warm`), waits for `ready`, serves, and puts (events, CPU seconds)."""
  from specedge_jax.serving import processes  # pylint: disable=g-import-not-at-top

  if cpus:
    processes.pin_to_cpus(cpus)  # before JAX starts its threads
  import dataclasses  # pylint: disable=g-import-not-at-top

  from specedge_jax.serving import runners, workload
  from specedge_jax.serving.serving_config import ServingConfig

  config = ServingConfig.load_json(config_json)
  engine = runners.build_draft_engine(config, num_slots=concurrent)
  # Ids of their own: an open that repeats a request id gets that request's session back.
  requests = [dataclasses.replace(r, request_id=f"d{index}-{r.request_id}")
              for r in workload.load_requests(config)[:num_requests]]
  warm.release()
  ready.wait()  # every drafter warmed up: they serve side by side, not one after another
  cpu0 = time.process_time()
  events, _ = asyncio.run(_drive(port, pki, engine, requests, concurrent=concurrent,
                                 max_new_tokens=config.workload.max_new_tokens, rtt_ms=rtt_ms))
  queue.put((events, time.process_time() - cpu0))


def measure_served_draft(config_json: str, *, passes: int = 2, **kwargs) -> dict[str, Any]:
  """`_served_draft_pass` `passes` times; each figure the least of its passes (other work on the
  machine only ever adds to one)."""
  runs = []
  for _ in range(passes):
    try:
      runs.append(_served_draft_pass(config_json, **kwargs))
    except RuntimeError as e:  # a pass that hung or failed: the others still measure
      if not runs and _ == passes - 1:
        raise
      (kwargs.get("on_line") or print)(f"served draft pass failed ({e}); skipped")
  best = dict(runs[0])
  for key in ("draft_median_ms", "round_overhead_median_ms", "process_cpu_ms_per_round"):
    best[key] = min(r[key] for r in runs)
    best[f"pass_{key}"] = [r[key] for r in runs]
  best["ops_median_ms"] = {op: min(r["ops_median_ms"].get(op, math.inf) for r in runs)
                           for op in runs[0]["ops_median_ms"]}
  return best


def _served_draft_pass(config_json: str, *, server_cpus: Sequence[int] = (0,),
                       client_cpus: Sequence[int] = (1,), drafters: int = 1,
                       concurrent: int = 2, num_requests: int = 16, rtt_ms: float = 14.0,
                       timeout_s: float = 180.0, on_line: Callable[[str], None] = print
                       ) -> dict[str, Any]:
  """The edge's work as drafters do it: `drafters` child processes, each the real draft engine
  of `config_json` in a Drafter (K = `concurrent`, simulated RTT), all pinned to `client_cpus`
  (as the sweep pins its drafters), against a fake verifier on `server_cpus`. From their events:
  the draft time per round and each device op's time; from their CPU clocks: the CPU seconds a
  round costs a drafter process in all (device, event loop, gRPC threads), beside the device's
  own share."""
  # pylint: disable-next=g-import-not-at-top
  from specedge_jax.serving.serving_config import ServingConfig

  with open(os.path.join(ServingConfig.load_json(config_json).models.draft, "config.json")) as f:
    vocab_size = int(json.load(f)["vocab_size"])
  pki = _pki(tempfile.mkdtemp(prefix="sim-draft-"))
  child, queue, stop, port = _start_server(server_cpus, pki, None, vocab_size)
  context = multiprocessing.get_context("spawn")
  results, warm, ready = context.Queue(), context.Semaphore(0), context.Event()
  children = [context.Process(target=_drafter_child, args=(
      i, tuple(client_cpus), pki, config_json, port, concurrent, num_requests, rtt_ms, results,
      warm, ready), daemon=True) for i in range(drafters)]
  outputs = []
  try:
    for process in children:
      process.start()
    for _ in children:
      while not warm.acquire(timeout=1.0):
        if not all(p.is_alive() for p in children):
          raise RuntimeError("a measured drafter failed while warming up")
    ready.set()
    deadline = time.monotonic() + timeout_s
    while len(outputs) < drafters:
      try:
        outputs.append(results.get(timeout=1.0))
      except Exception:  # pylint: disable=broad-except (queue.Empty)
        if time.monotonic() > deadline or not all(p.is_alive() or p.exitcode == 0
                                                  for p in children):
          raise RuntimeError("a measured drafter failed")
    for process in children:
      process.join(timeout=30)
  finally:
    for process in children:  # ours: a hung one must not outlive the measurement
      if process.is_alive():
        process.terminate()
    _stop_server(child, queue, stop)
  events = [e for out, _ in outputs for e in out]
  busy: dict[str, list[float]] = {}
  for e in events:
    if e["kind"] == "edge_busy":
      busy.setdefault(e["op"], []).append(e["t_end"] - e["t_start"])
  rounds = _rounds(events)
  cpu_per_round = sum(cpu for _, cpu in outputs) / max(len(rounds), 1)
  result = {"drafters": drafters, "concurrent": concurrent, "rounds": len(rounds),
            "rtt_ms": rtt_ms, "client_cpus": list(client_cpus),
            "draft_median_ms": _median_ms([e["draft_time_s"] for e in rounds]),
            "ops_median_ms": {op: _median_ms(v) for op, v in busy.items()},
            "round_overhead_median_ms": _median_ms(_overheads(rounds, rtt_ms)),
            "process_cpu_ms_per_round": 1000.0 * cpu_per_round, "machine": _machine()}
  on_line(f"served draft ({drafters} drafter(s) x K={concurrent} on cores {list(client_cpus)}, "
          f"RTT {rtt_ms:g} ms, fake verifier): draft {result['draft_median_ms']:.2f} ms; ops " +
          ", ".join(f"{op} {ms:.2f}" for op, ms in result["ops_median_ms"].items()) +
          f"; round overhead {result['round_overhead_median_ms']:.2f} ms; process CPU per "
          f"round {result['process_cpu_ms_per_round']:.2f} ms")
  return result


def calibrate_all(config_json: str, *, server_cpus: Sequence[int] = (0,),
                  client_cpus: Sequence[int] = (1,), engine_cpus: Sequence[int] = (0,),
                  drafters: Sequence[int] = (1, 2, 4), on_line: Callable[[str], None] = print
                  ) -> dict[str, Any]:
  """All four measurements, in the order that keeps JAX out of this process until the last one
  (which pins it to `engine_cpus` first): what `launch.simulate --calibrate` writes."""
  from specedge_jax.serving import processes  # pylint: disable=g-import-not-at-top
  from specedge_jax.serving.serving_config import ServingConfig

  started = time.perf_counter()
  cpus = dict(server_cpus=tuple(server_cpus), client_cpus=tuple(client_cpus))
  out: dict[str, Any] = {"config": config_json}
  out["grpc"] = measure_grpc_round(**cpus, on_line=on_line)
  out["served_verify"] = measure_served_verify(config_json, **cpus, on_line=on_line)
  out["served_draft"] = [measure_served_draft(config_json, **cpus, drafters=n, on_line=on_line)
                         for n in drafters]
  processes.pin_to_cpus(engine_cpus)  # before JAX starts its threads
  out["engines"] = measure_engines(ServingConfig.load_json(config_json), on_line=on_line)
  out["wall_s"] = time.perf_counter() - started
  return out


def write(path: str, data: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  payload = {"format": FORMAT, **data}
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)
