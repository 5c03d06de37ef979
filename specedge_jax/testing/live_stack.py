"""A verifier and one HTTP edge with the real engines, in this process, for tests and benchmarks.

`LiveStack` runs the whole serving path on one background event loop, through the same functions
the launchers call: `runners.serve_verifier` (the target engine, gRPC and Prometheus metrics on
free loopback ports) and `runners.serve_drafter_http` (the real draft engine and the
OpenAI-compatible API on another free port). The caller talks HTTP to `base_url` exactly as a
user would, and reads the verifier's open sessions from its /metrics to check that slots come
back. `reference_greedy` gives target-only greedy decoding on a second target
engine of the same model, for the equivalence checks. Loads JAX (unlike the rest of testing/).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import threading
import time
import urllib.request
from typing import Sequence

from specedge_jax.serving import runners
from specedge_jax.serving import workload
from specedge_jax.serving.serving_config import ServingConfig


class LiveStack:
  """Usage:

      with LiveStack(config, events_path=...) as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key="unused")
        stack.sessions()          # open on the verifier, read from its /metrics
  """

  def __init__(self, config: ServingConfig, *, events_path: str | None = None,
               verifier_events_path: str | None = None, start_timeout_s: float = 600.0):
    self.config = config
    self.events_path = events_path
    self.verifier_events_path = verifier_events_path
    self._start_timeout_s = start_timeout_s
    self.port: int | None = None  # the HTTP API's
    self.metrics_port: int | None = None  # the verifier's Prometheus endpoint
    self._loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self._loop.run_forever, name="live-stack",
                                    daemon=True)
    self._stop: asyncio.Event | None = None
    self._tasks: list[concurrent.futures.Future] = []
    self.tokenizer = workload.load_tokenizer(config.models.tokenizer_dir)

  @property
  def base_url(self) -> str:
    return f"http://127.0.0.1:{self.port}/v1"

  def _start(self, coro) -> concurrent.futures.Future:
    task = asyncio.run_coroutine_threadsafe(coro, self._loop)
    self._tasks.append(task)
    return task

  def _wait(self, ready: concurrent.futures.Future, what: str) -> int:
    deadline = time.monotonic() + self._start_timeout_s
    while not ready.done():
      failed = [t for t in self._tasks if t.done() and t.exception() is not None]
      if failed:
        raise RuntimeError(f"LiveStack: {what} failed to start") from failed[0].exception()
      if time.monotonic() > deadline:
        raise TimeoutError(f"LiveStack: {what} did not start in {self._start_timeout_s:.0f} s")
      time.sleep(0.05)
    return ready.result()

  def __enter__(self) -> "LiveStack":
    self._thread.start()
    self._stop = asyncio.run_coroutine_threadsafe(self._make_event(), self._loop).result(10)
    grpc_ready: concurrent.futures.Future[int] = concurrent.futures.Future()
    metrics_ready: concurrent.futures.Future[int] = concurrent.futures.Future()
    http_ready: concurrent.futures.Future[int] = concurrent.futures.Future()
    try:
      # The verifier first: the edge's warm-up and the target's would share the cores anyway.
      self._start(runners.serve_verifier(
          self.config, port=0, events_path=self.verifier_events_path, metrics_port=0,
          on_ready=grpc_ready.set_result, on_metrics_ready=metrics_ready.set_result,
          stop=self._stop))
      grpc_port = self._wait(grpc_ready, "the verifier")
      self.metrics_port = metrics_ready.result(1)
      self._start(runners.serve_drafter_http(
          self.config, f"127.0.0.1:{grpc_port}", http_port=0, events_path=self.events_path,
          stop=self._stop, on_ready=http_ready.set_result))
      self.port = self._wait(http_ready, "the HTTP edge")
    except BaseException:
      self.__exit__(None, None, None)
      raise
    return self

  async def _make_event(self) -> asyncio.Event:
    return asyncio.Event()

  def __exit__(self, *exc) -> None:
    if self._stop is not None:
      self._loop.call_soon_threadsafe(self._stop.set)
    for task in self._tasks:
      try:
        task.result(60)
      except Exception:  # pylint: disable=broad-except (reported by _wait or the test)
        pass
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(10)

  def verifier_metrics(self) -> dict[tuple[str, tuple], float]:
    """The verifier's /metrics samples: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families  # pylint: disable=g-import-not-at-top

    url = f"http://127.0.0.1:{self.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
      text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}

  def sessions(self) -> int:
    """Sessions open on the verifier now (its `specedge_verifier_sessions` gauge)."""
    return int(self.verifier_metrics()[("specedge_verifier_sessions", ())])


def reference_greedy(config: ServingConfig, prompts: Sequence[Sequence[int]],
                     max_new_tokens: int) -> list[list[int]]:
  """Target-only greedy decoding of `prompts` (the equivalence reference), on its own engine."""
  from specedge_jax import engine as E  # pylint: disable=g-import-not-at-top

  model = runners.load_model(config.models.target, config.models.dtype)
  engine = E.TargetEngine(model, num_slots=len(prompts), max_len=config.server.max_len,
                          max_tree_nodes=config.max_tree_nodes, max_batch_size=len(prompts))
  return E.generate(engine, prompts, max_new_tokens=max_new_tokens).tokens


def embedded_config(**edge_overrides) -> ServingConfig:
  """The main job's config (configs/embedded.py) with `edge` fields replaced."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), "configs", "embedded.py")
  spec = importlib.util.spec_from_file_location("embedded_config", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = ServingConfig.from_mapping(module.get_config())
  return dataclasses.replace(config, edge=dataclasses.replace(config.edge, **edge_overrides))
