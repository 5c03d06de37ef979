"""A load test of the serving stack: many simulated edge clients, faults injected, bounded.

The verifier runs the hand-checkable fake target (`testing.fakes`), so every request's exact
output is known in advance and the test can count tokens lost or repeated; what is measured is
the serving stack itself (gRPC, batching, leases, retries, resumption), not a model. Clients are
real `Drafter`s with fake draft engines, reaching the verifier through the fault proxy
(`testing.fault_proxy`), each serving its requests K at a time until the time or request bound.

Reports requests completed, errors by status, request latency p50/p99, the worst wait for a slot
(time from submission to the first token), and tokens lost or repeated (the stream against the
known output; both must be 0). Traffic stays on 127.0.0.1 and every loop is bounded.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time

import grpc
import numpy as np

from specedge_jax.measure.events import EventLog
from specedge_jax.serving.drafter import Drafter, DrafterConfig, EdgeRequest
from specedge_jax.serving.serving_config import BatchingConfig
from specedge_jax.serving.verifier import VerifierServer
from specedge_jax.testing.fakes import FakeDraftEngine, FakeTargetEngine, expected_output
from specedge_jax.testing.fault_proxy import FaultProxy, Faults

VOCAB = 50
_CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 50),
                    ("grpc.max_reconnect_backoff_ms", 500))


@dataclasses.dataclass(frozen=True)
class LoadConfig:
  clients: int = 16
  requests_per_client: int = 2  # K, interleaved on each client
  duration_s: float = 600.0
  max_requests: int = 100_000  # in total, a bound beside the duration
  max_new_tokens: int = 48
  num_slots: int = 24
  max_batch_size: int = 8
  batching: str = "dynamic"
  forward_delay_s: float = 0.002  # the fake target's forward time
  lease_s: float = 5.0
  faults: Faults = Faults(delay_p=0.3, max_delay_s=0.02, drop_request_p=0.01,
                          drop_reply_p=0.01, cut_before_p=0.01, cut_after_p=0.01, hold_s=5.0)
  seed: int = 0

  def __post_init__(self):
    if self.clients < 1 or self.requests_per_client < 1 or self.max_requests < 1:
      raise ValueError("clients, requests_per_client and max_requests must be >= 1")
    if not self.duration_s > 0:
      raise ValueError(f"duration_s must be > 0, got {self.duration_s}")


@dataclasses.dataclass
class LoadReport:
  config: LoadConfig
  wall_s: float
  completed: int
  errors: dict[str, int]  # status name -> requests that ended in it
  latency_p50_s: float
  latency_p99_s: float
  worst_slot_wait_s: float
  tokens_lost: int
  tokens_repeated: int
  mismatched_requests: int  # completed requests whose stream is not exactly the target's output
  resumed: int  # requests that moved to a new session
  fault_counts: dict[str, int]

  def rows(self) -> list[tuple[str, str]]:
    errors = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
    faults = ", ".join(f"{k} {v}" for k, v in self.fault_counts.items())
    return [
        ("clients x K", f"{self.config.clients} x {self.config.requests_per_client}"),
        ("wall time", f"{self.wall_s:.1f} s"),
        ("requests completed", str(self.completed)),
        ("errors by status", errors),
        ("request latency p50 / p99", f"{self.latency_p50_s:.3f} / {self.latency_p99_s:.3f} s"),
        ("worst wait for a slot", f"{self.worst_slot_wait_s:.3f} s"),
        ("tokens lost / repeated", f"{self.tokens_lost} / {self.tokens_repeated}"),
        ("requests not exactly the target's output", str(self.mismatched_requests)),
        ("requests resumed in a new session", str(self.resumed)),
        ("injected faults", faults),
    ]


def compare_stream(stream: list[int], expected: list[int]) -> tuple[int, int, bool]:
  """(tokens lost, tokens repeated, whether the stream differs at all) against the exact output."""
  streamed, wanted = collections.Counter(stream), collections.Counter(expected)
  return (sum((wanted - streamed).values()), sum((streamed - wanted).values()),
          stream != expected)


async def run_load(config: LoadConfig, on_progress=None) -> LoadReport:
  """Runs the load test; `on_progress(completed, elapsed_s)` is called as requests finish."""
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=config.num_slots,
                            max_batch_size=config.max_batch_size,
                            forward_delay_s=config.forward_delay_s)
  server = VerifierServer(target, batching=BatchingConfig(mode=config.batching),
                          session_timeout_s=config.lease_s)
  port = await server.start("127.0.0.1:0")
  proxy = FaultProxy(f"127.0.0.1:{port}", config.faults, seed=config.seed)
  proxy_port = await proxy.start()
  channel = grpc.aio.insecure_channel(f"127.0.0.1:{proxy_port}", options=list(_CHANNEL_OPTIONS))
  log = EventLog(None, "specedge")
  streams: dict[str, list[int]] = collections.defaultdict(list)
  expected: dict[str, list[int]] = {}
  started = time.monotonic()
  deadline = started + config.duration_s
  issued = 0
  outputs = []

  def next_request(client: int) -> EdgeRequest | None:
    nonlocal issued
    if issued >= config.max_requests or time.monotonic() >= deadline:
      return None
    issued += 1
    prompt = (1 + client % (VOCAB - 1), 1 + issued % (VOCAB - 1))
    request = EdgeRequest(request_id=f"c{client}-{issued}", prompt_ids=prompt)
    expected[request.request_id] = expected_output(prompt, config.max_new_tokens, VOCAB)
    return request

  def on_tokens(request_id, tokens, finished):
    streams[request_id].extend(tokens)

  drafter_config = DrafterConfig(max_concurrent_requests=config.requests_per_client,
                                 max_new_tokens=config.max_new_tokens, rpc_timeout_s=1.0,
                                 verify_retries=4, verify_retry_initial_s=0.02,
                                 open_retry_max_s=0.2, reconnect_give_up_s=30.0)

  async def client(index: int) -> None:
    while True:
      batch = [r for r in (next_request(index) for _ in range(config.requests_per_client)) if r]
      if not batch:
        return
      # One drafter per batch: each run() has its own device thread, and an engine has one
      # owner thread.
      drafter = Drafter(FakeDraftEngine(vocab_size=VOCAB, num_slots=config.requests_per_client,
                                        correct_depth=2), channel,
                        dataclasses.replace(drafter_config, client_id=f"edge{index}"),
                        event_log=log, on_tokens=on_tokens)
      outputs.extend(await drafter.run(batch))
      if on_progress is not None:
        on_progress(len(outputs), time.monotonic() - started)

  try:
    await asyncio.gather(*(client(i) for i in range(config.clients)))
  finally:
    await channel.close()
    await proxy.stop()
    await server.stop(grace=None)
  wall = time.monotonic() - started

  errors: collections.Counter[str] = collections.Counter()
  lost = repeated = mismatched = 0
  for output in outputs:
    if output.error:  # "ServerError: OpenSession: UNAVAILABLE: ..." -> the status name
      statuses = [part.strip() for part in output.error.split(":")
                  if part.strip().isupper() and "_" in part or part.strip().isupper()]
      errors[statuses[0] if statuses else output.error[:60]] += 1
      continue
    lost_one, repeated_one, differs = compare_stream(streams[output.request_id],
                                                     expected[output.request_id])
    lost, repeated, mismatched = lost + lost_one, repeated + repeated_one, mismatched + differs
  starts = {e["request_id"]: e["t"] for e in log.events if e["kind"] == "request_start"}
  ends = {e["request_id"]: e["t"] for e in log.events if e["kind"] == "request_end"}
  first = {}
  for e in log.events:
    if e["kind"] == "request_step" and e.get("phase") == "prefill":
      first.setdefault(e["request_id"], e["t"])
  latencies = [ends[r] - starts[r] for r in ends if r in starts]
  slot_waits = [first[r] - starts[r] for r in first if r in starts]
  counts = proxy.counts
  return LoadReport(
      config=config, wall_s=wall, completed=sum(1 for o in outputs if not o.error),
      errors=dict(errors),
      latency_p50_s=float(np.percentile(latencies, 50)) if latencies else float("nan"),
      latency_p99_s=float(np.percentile(latencies, 99)) if latencies else float("nan"),
      worst_slot_wait_s=max(slot_waits, default=float("nan")), tokens_lost=lost,
      tokens_repeated=repeated, mismatched_requests=mismatched,
      resumed=len({e["request_id"] for e in log.events if e["kind"] == "request_resumed"}),
      fault_counts={"calls": counts.calls, "delayed": counts.delayed,
                    "dropped requests": counts.dropped_requests,
                    "dropped replies": counts.dropped_replies, "cut before": counts.cut_before,
                    "cut after": counts.cut_after})
