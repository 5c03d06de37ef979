"""A verifier and one HTTP edge with the real engines, in this process, for tests and benchmarks.

`LiveStack` runs the whole serving path on one background event loop: the target engine behind
a `VerifierServer` (gRPC on a free loopback port), and `runners.serve_drafter_http` with the real
draft engine and the OpenAI-compatible API on another free port. The caller talks HTTP to
`base_url` exactly as a user would, and can look at the verifier's sessions (`server`) to check
that slots come back. `reference_greedy` gives target-only greedy decoding on a second target
engine of the same model, for the equivalence checks. Loads JAX (unlike the rest of testing/).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import threading
from typing import Sequence

from specedge_jax.serving import runners
from specedge_jax.serving import workload
from specedge_jax.serving.serving_config import ServingConfig
from specedge_jax.serving.verifier import VerifierServer


class LiveStack:
  """Usage:

      with LiveStack(config, events_path=...) as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key="unused")
  """

  def __init__(self, config: ServingConfig, *, events_path: str | None = None,
               start_timeout_s: float = 600.0):
    self.config = config
    self.events_path = events_path
    self._start_timeout_s = start_timeout_s
    self.server: VerifierServer | None = None
    self.port: int | None = None  # the HTTP API's
    self._loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self._loop.run_forever, name="live-stack",
                                    daemon=True)
    self._stop: asyncio.Event | None = None
    self._edge: concurrent.futures.Future | None = None
    self.tokenizer = workload.load_tokenizer(config.models.tokenizer_dir)

  @property
  def base_url(self) -> str:
    return f"http://127.0.0.1:{self.port}/v1"

  def run(self, coro, timeout_s: float = 60.0):
    """Runs `coro` on the stack's loop (for looking at the verifier's state) and returns it."""
    return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

  def __enter__(self) -> "LiveStack":
    self._thread.start()
    engine = runners.build_target_engine(self.config)
    self.server = VerifierServer(
        engine, batching=self.config.server.batching, tokenizer=self.tokenizer,
        session_timeout_s=self.config.server.session_timeout_s,
        admission_queue=self.config.server.admission_queue,
        admission_wait_s=self.config.server.admission_wait_s)
    grpc_port = self.run(self.server.start("127.0.0.1:0"))
    ready: concurrent.futures.Future[int] = concurrent.futures.Future()

    async def edge() -> None:
      self._stop = asyncio.Event()
      await runners.serve_drafter_http(
          self.config, f"127.0.0.1:{grpc_port}", http_host="127.0.0.1", http_port=0,
          events_path=self.events_path, stop=self._stop, on_ready=ready.set_result)

    self._edge = asyncio.run_coroutine_threadsafe(edge(), self._loop)
    try:
      self.port = ready.result(self._start_timeout_s)
    except BaseException:
      if self._edge.done() and self._edge.exception() is not None:
        raise self._edge.exception() from None  # type: ignore[misc]
      raise
    return self

  def __exit__(self, *exc) -> None:
    if self._stop is not None:
      self._loop.call_soon_threadsafe(self._stop.set)
    if self._edge is not None:
      self._edge.result(60)
    if self.server is not None:
      self.run(self.server.stop(grace=None))
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(10)

  def sessions(self) -> int:
    """Sessions open on the verifier now."""
    if self.server is None or self.server.servicer is None:
      raise RuntimeError("LiveStack: not started")
    servicer = self.server.servicer

    async def count() -> int:
      return len(servicer.sessions)

    return self.run(count())


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
