"""What each serving process does, as library functions behind the thin launchers.

`serve_verifier` (launch/verifier.py), `run_drafter` (launch/drafter.py) and `run_server_only`
(launch/server_only.py) load models from a `ServingConfig`, build engines, warm them up (so no
compilation lands inside a measured run), and run. This module owns that wiring; the serving
logic itself is in verifier.py, drafter.py and baselines.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Sequence
from typing import Any, Callable

import grpc

from specedge_jax.engine import DraftEngine, TargetEngine, prefix_cache
from specedge_jax.measure.events import EventLog
from specedge_jax.models import sharding as sharding_lib
from specedge_jax.data import tokenizer_fingerprint as fingerprint_lib
from specedge_jax.data.tokenizers import has_tokenizer
from specedge_jax.serving import baselines
from specedge_jax.serving import health_wait
from specedge_jax.serving import io_threads
from specedge_jax.serving import prefill_store
from specedge_jax.serving import slo_admission
from specedge_jax.serving import security as security_lib
from specedge_jax.serving import speculation_controller
from specedge_jax.serving import workload
from specedge_jax.serving.serving_config import ServingConfig
from specedge_jax.serving.drafter import Drafter, DrafterConfig, RequestOutput
from specedge_jax.serving.verifier import VerifierServer
from specedge_jax.serving.verify_time import VerifyTimeEstimator

_log = logging.getLogger(__name__)


def load_model(path: str, dtype: str = ""):
  from specedge_jax.checkpoints import orbax_io  # pylint: disable=g-import-not-at-top (loads orbax)

  return orbax_io.load_model(path, dtype=dtype or None)


def event_log(path: str | None, system: str) -> EventLog | None:
  return EventLog(path, system) if path else None


def plan_target_memory(config: ServingConfig, mesh=None):
  """The verifier's memory plan (engine/memory_plan.py) from the checkpoint's config alone;
  raises MemoryPlanError, before any weight is read, when it does not fit the devices."""
  from specedge_jax.checkpoints import orbax_io  # pylint: disable=g-import-not-at-top
  from specedge_jax.checkpoints.hf import DTYPES  # pylint: disable=g-import-not-at-top
  from specedge_jax.engine import memory_plan  # pylint: disable=g-import-not-at-top

  server = config.server
  model_config, stored_dtype = orbax_io.checkpoint_config(config.models.target)
  device_bytes, label = memory_plan.device_capacity(
      None if mesh is None else list(mesh.devices.flat))
  if server.device_memory_gb:
    device_bytes, label = (int(server.device_memory_gb * memory_plan.GIB),
                           "server.device_memory_gb")
  dtype = DTYPES[config.models.dtype or stored_dtype]
  plan = memory_plan.plan(
      model_config, param_dtype=dtype, max_len=server.max_len, num_slots=server.num_slots,
      max_batch_size=server.max_batch_size, max_tree_nodes=config.max_tree_nodes,
      mesh=sharding_lib.parse_mesh_shape(server.mesh_shape), device_bytes=device_bytes,
      device_label=label, headroom=server.memory_headroom)
  _log.info("%s", plan.table())
  memory_plan.check_fits(plan)
  return plan


def build_target_engine(config: ServingConfig, model=None, *,
                        decode: bool = True) -> TargetEngine:
  """The verifier's engine, warmed up (every batch bucket, prefill chunk and snapshot copy).

  Its memory is planned first and a configuration that does not fit is refused before any
  weight is read (`plan_target_memory`). With `server.mesh_shape`, each weight is placed on its
  shards as it is read. `decode` False skips the decode programs (a third of the warm-up),
  which only the autoregressive baseline runs; a SpecEdge verifier only verifies."""
  # The "... loaded in" / "... warmed up in" lines mark start-up phases (bench/startup.py).
  server = config.server
  shape = sharding_lib.parse_mesh_shape(server.mesh_shape)
  mesh = sharding_lib.make_mesh(shape) if shape["data"] * shape["model"] > 1 else None
  loads_model = model is None
  if loads_model:
    plan_target_memory(config, mesh)
  start = time.perf_counter()
  if loads_model:
    from specedge_jax.checkpoints import orbax_io  # pylint: disable=g-import-not-at-top

    model = orbax_io.load_model(
        config.models.target, dtype=config.models.dtype or None,
        sharding_for=sharding_lib.placement_for(mesh) if mesh is not None else None)
  loaded = time.perf_counter()
  _log.info("target model loaded in %.2f s", loaded - start)
  engine = TargetEngine(model, num_slots=server.num_slots, max_len=server.max_len,
                        max_tree_nodes=config.max_tree_nodes,
                        max_batch_size=server.max_batch_size, prefill_chunk=server.prefill_chunk,
                        attention_min_rows=server.attention_min_rows, mesh=mesh,
                        tree_buckets=tuple(server.tree_buckets),
                        consume_model=loads_model)  # no one else holds the model
  engine.warmup(decode=decode, prefill_snapshots=server.prefill_cache_entries > 0)
  _log.info("target engine warmed up in %.2f s", time.perf_counter() - loaded)
  return engine


def build_draft_engine(config: ServingConfig, num_slots: int | None = None, model=None, *,
                       tokenizer: fingerprint_lib.TokenizerFingerprint | None = None
                       ) -> DraftEngine:
  """An edge's draft engine (of `config.models.draft`), warmed up (one drafter at a time per
  compilation cache, so that drafters started together compile the draft programs once:
  `compile_lock`). With `tokenizer`, a model whose embedding is smaller than that tokenizer's
  vocabulary is refused (ValueError) before the warm-up."""
  from specedge_jax.engine import compile_lock  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  model = model or load_model(config.models.draft, config.models.dtype)
  loaded = time.perf_counter()
  _log.info("draft model loaded in %.2f s", loaded - start)
  if tokenizer is not None:
    fingerprint_lib.check_model_vocab(int(model.config.vocab_size), tokenizer,
                                      f"the draft model {config.models.draft}")
  engine = DraftEngine(model, num_slots=num_slots or config.edge.requests_per_drafter,
                       max_len=config.edge.max_len, tree=config.tree, proactive=config.proactive)
  with compile_lock.exclusive("draft-warmup") as waited_s:
    engine.warmup()
  _log.info("draft engine warmed up in %.2f s (%.2f s of it waiting for another process's "
            "warm-up)", time.perf_counter() - loaded, waited_s)
  return engine


async def serve_verifier(config: ServingConfig, *, host: str = "127.0.0.1", port: int = 50051,
                         port_file: str | None = None, events_path: str | None = None,
                         run_id: str | None = None,
                         on_ready: Callable[[int], None] | None = None,
                         security: security_lib.ServerSecurity | None = None,
                         metrics_port: int | None = None, metrics_host: str = "127.0.0.1",
                         on_metrics_ready: Callable[[int], None] | None = None,
                         stop: asyncio.Event | None = None,
                         io_cpus: Sequence[int] = ()) -> None:
  """Loads the target, serves until SIGINT/SIGTERM (or `stop` is set), then shuts down
  gracefully.

  `io_cpus` moves the network threads (gRPC's, the asyncio loop's) to those cores once serving,
  keeping XLA's compute on the cores the process was started on (`io_threads.py`).

  `security` None serves plaintext without authentication (the old behaviour); the launcher
  always passes one. `metrics_port` (0: any free port) serves Prometheus metrics over HTTP."""
  if security is not None:
    security_lib.server_credentials(security)  # a refused config fails before the model loads
  placer = io_threads.IoThreadPlacer(io_cpus) if io_cpus else None  # refused before loading too
  engine = build_target_engine(config, decode=False)  # a verifier only verifies
  tokenizer, fingerprint = None, None
  if has_tokenizer(config.models.tokenizer_dir):
    tokenizer = workload.load_tokenizer(config.models.tokenizer_dir)
    # What every edge's tokenizer is compared with at open; the target's embedding must cover it.
    fingerprint = fingerprint_lib.of_tokenizer(tokenizer)
    fingerprint_lib.check_model_vocab(int(engine.vocab_size), fingerprint,
                                      f"the target model {config.models.target}")
  log = event_log(events_path, "specedge")
  metrics = None
  if metrics_port is not None:
    from specedge_jax.measure import prometheus  # pylint: disable=g-import-not-at-top

    metrics = prometheus.VerifierMetrics()
    # Events feed the metrics; without a log file none are kept in memory.
    log = log or EventLog(None, "specedge", keep_in_memory=False)
    log.add_listener(metrics.observe)
  if log is not None and run_id:
    log = _Tagged(log, run_id=run_id)
  prefill_entries, precomputed = config.server.prefill_cache_entries, None
  if config.server.prefill_precompute:
    kv_rows, device = engine.cache.k, next(iter(engine.cache.k.devices()))
    precomputed = prefill_store.precompute_for_serving(
        config, engine, prefix_cache.PrefillSnapshot, tokenizer=tokenizer,
        dtype=f"params {config.models.dtype or 'as stored'}, kv cache {kv_rows.dtype}",
        numerics=prefill_store.numerics_tag(f"{device.platform} {device.device_kind}",
                                            f"prefill_chunk {config.server.prefill_chunk}"))
    # Every precomputed prompt stays; prefill_cache_entries is the room left for the others.
    prefill_entries += len(precomputed.snapshots)
  server = VerifierServer(engine, batching=config.server.batching, tokenizer=tokenizer,
                          tokenizer_fingerprint=fingerprint,
                          event_log=log, prefill_cache_entries=prefill_entries,
                          session_timeout_s=config.server.session_timeout_s,
                          max_sessions_per_client=config.server.max_sessions_per_client,
                          admission_queue=config.server.admission_queue,
                          admission_wait_s=config.server.admission_wait_s,
                          security=security,
                          verify_time=VerifyTimeEstimator.from_config(
                              config.server.verify_time_path, config.server.verify_time_seed),
                          controller=speculation_controller.SpeculationController(
                              config.tree, speculation_controller.ControllerConfig(
                                  reach_threshold=config.server.control_reach_threshold))
                          if config.server.speculation_control else None,
                          slo_admission=slo_admission.for_server(
                              config.server.num_slots, config.server.max_batch_size)
                          if config.server.slo_admission else None)
  if precomputed is not None and server.prefill_cache is not None:
    precomputed.seed(server.prefill_cache)  # opens of these prompts take the cache's hit path
  bound = await server.start(f"{host}:{port}")
  _log.info("verifier serving on %s:%d (%s)", host, bound,
            security.describe() if security is not None else "plaintext, no authentication")
  if port_file:
    # Written atomically: the launcher polls for it and must never read half a number.
    tmp = f"{port_file}.tmp"
    with open(tmp, "w") as f:
      f.write(str(bound))
    os.replace(tmp, port_file)
  if metrics is not None:
    servicer = server.servicer
    if servicer is None:
      raise RuntimeError("the verifier started without a servicer")
    metrics.set_gauge_sources(free_slots=lambda: servicer.free_slots,
                              sessions=lambda: len(servicer.sessions),
                              admission_queue=lambda: servicer.admission_queue_length)
    metrics_bound = prometheus.serve_http(metrics.registry, metrics_port or 0, metrics_host)
    _log.info("verifier metrics at http://%s:%d/metrics", metrics_host, metrics_bound)
    if on_metrics_ready is not None:
      on_metrics_ready(metrics_bound)
  if placer is not None:
    placer.start()  # serving: gRPC's threads exist, the engine thread runs on the compute cores
  if on_ready is not None:
    on_ready(bound)
  stop = stop or _stop_on_signals()
  await stop.wait()
  if placer is not None:
    placer.stop()
  _log.info("verifier draining: no new sessions, up to %.1f s for the open ones",
            config.server.drain_s)
  left = await server.drain(config.server.drain_s)
  _log.info("verifier shutting down (%d sessions handed back)", left)
  await server.stop(grace=2.0)
  if log is not None:
    log.close()


class _Tagged(EventLog):
  """An EventLog view that adds fixed fields (run_id) to every event; `log` does the writing."""

  def __init__(self, log: EventLog, **tags):
    super().__init__(None, log.system)  # no file of its own
    self._log, self._tags = log, tags
    self.events = log.events

  def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
    return self._log.emit(kind, **self._tags, **fields)

  def close(self) -> None:
    self._log.close()


def _channel(address: str, security: security_lib.ClientSecurity | None) -> grpc.aio.Channel:
  # None: a plaintext channel without a token (the old behaviour, for library callers).
  return grpc.aio.insecure_channel(address) if security is None else \
      security_lib.open_channel(address, security)


async def wait_for_server(address: str, timeout_s: float,
                          security: security_lib.ClientSecurity | None = None) -> None:
  """Waits until the verifier's health service says SERVING (on a channel of its own)."""
  async with _channel(address, security) as channel:
    await wait_for_serving(channel, address, timeout_s)


async def wait_for_serving(channel: grpc.aio.Channel, address: str, timeout_s: float) -> None:
  """Waits until the verifier's health service says SERVING over `channel`.

  Ask over the channel that will carry the calls: its connection is the one that answered.
  `launch.local` holds the verifier's port with a NOT_SERVING stand-in until the verifier
  serves beside it on the same port (`local._PortHolder`); a connection that landed on the
  stand-in keeps hearing NOT_SERVING until the stand-in goes and the channel reconnects to the
  verifier. A separate health channel could hear SERVING from the verifier while this one still
  talks to the stand-in, whose answer to an OpenSession is UNIMPLEMENTED."""
  await health_wait.wait_until_serving(channel, "specedge.v1.Verifier", what="verifier",
                                       address=address, timeout_s=timeout_s)


def with_drafter_model(config: ServingConfig, client_index: int) -> ServingConfig:
  """The config as drafter `client_index` runs it: `models.draft` is its own draft model
  (`ModelsConfig.draft_for`), and `models.drafts` is spent."""
  models = dataclasses.replace(config.models, draft=config.models.draft_for(client_index),
                               drafts=())
  return dataclasses.replace(config, models=models)


def edge_tokenizer(config: ServingConfig) -> fingerprint_lib.TokenizerFingerprint | None:
  """The fingerprint an edge sends at open: of its draft folder's own tokenizer, else of the
  configured one (which its prompts are tokenized with); None when neither folder holds a
  tokenizer (random test checkpoints), and the verifier then checks nothing."""
  for folder in (config.models.draft, config.models.tokenizer_dir):
    if has_tokenizer(folder):
      return fingerprint_lib.of_tokenizer(workload.load_tokenizer(folder))
  return None


def draft_model_name(config: ServingConfig) -> str:
  """The draft model as the edge's events name it: its folder's name."""
  return os.path.basename(os.path.normpath(config.models.draft))


def _drafter_config(config: ServingConfig, client_index: int, *,
                    tokenizer: fingerprint_lib.TokenizerFingerprint | None = None
                    ) -> DrafterConfig:
  edge = config.edge
  return DrafterConfig(
      client_id=f"edge{client_index}", max_concurrent_requests=edge.requests_per_drafter,
      max_queued_requests=edge.max_queued_requests, interleave=edge.interleave,
      proactive=config.proactive.enabled, max_new_tokens=config.workload.max_new_tokens,
      sampling=config.workload.sampling, seed=config.workload.seed,
      simulated_rtt_ms=edge.simulated_rtt_ms, open_give_up_s=edge.open_give_up_s,
      speculative_first_round=edge.speculative_first_round,
      rpc_timeout_s=edge.rpc_timeout_s, verify_retries=edge.verify_retries,
      reconnect_give_up_s=edge.reconnect_give_up_s, draft_model=draft_model_name(config),
      tokenizer=tokenizer, itl_slo_ms=edge.itl_slo_ms)


async def run_drafter(config: ServingConfig, server_address: str, *, client_index: int = 0,
                      events_path: str | None = None, run_id: str | None = None,
                      on_tokens=None, connect_timeout_s: float = 600.0,
                      security: security_lib.ClientSecurity | None = None) -> list[RequestOutput]:
  """Loads this client's draft model (`ModelsConfig.draft_for`), serves its share of the
  workload, returns the outputs. Raises `drafter.TokenizerRefused` when the verifier refuses
  the draft's tokenizer.

  `security` None connects in plaintext without a token (the old behaviour)."""
  if security is not None:
    security.require_allowed()  # a refused config fails before the model loads
  config = with_drafter_model(config, client_index)
  requests = workload.requests_for_client(config, client_index)  # by workload.mode
  tokenizer = edge_tokenizer(config)
  engine = build_draft_engine(config, tokenizer=tokenizer)
  log = event_log(events_path, "specedge")
  tags = {"run_id": run_id} if run_id else {}
  drafter_config = _drafter_config(config, client_index, tokenizer=tokenizer)
  try:
    async with _channel(server_address, security) as channel:
      await wait_for_serving(channel, server_address, connect_timeout_s)
      drafter = Drafter(engine, channel, drafter_config, event_log=log, event_tags=tags,
                        on_tokens=on_tokens)
      return await drafter.run(requests)
  finally:
    if log is not None:
      log.close()


async def serve_drafter_http(config: ServingConfig, server_address: str, *,
                             client_index: int = 0, http_host: str = "127.0.0.1",
                             http_port: int = 8000, http_port_file: str | None = None,
                             api_keys: frozenset[str] = frozenset(), model_name: str = "",
                             events_path: str | None = None, run_id: str | None = None,
                             security: security_lib.ClientSecurity | None = None,
                             stop: asyncio.Event | None = None,
                             on_ready: Callable[[int], None] | None = None,
                             connect_timeout_s: float = 600.0) -> None:
  """Loads the draft model and serves the OpenAI-compatible HTTP API, the chat page and
  /metrics on this edge, in this event loop beside the gRPC client, until SIGINT/SIGTERM (or
  `stop` is set). HTTP requests join the drafter's K interleaved requests, so pipeline-aware
  scheduling and proactive drafting apply to them; beyond K they wait in a queue of
  `edge.max_queued_requests` places, past which they get 429."""
  from specedge_jax.measure import prometheus  # pylint: disable=g-import-not-at-top
  from specedge_jax.serving import http_api  # pylint: disable=g-import-not-at-top (fastapi)

  if security is not None:
    security.require_allowed()  # a refused config fails before the model loads
  if not has_tokenizer(config.models.tokenizer_dir):
    raise ValueError(f"the HTTP API needs the target's tokenizer (chat template, decoding); "
                     f"{config.models.tokenizer_dir!r} holds none: set models.tokenizer")
  config = with_drafter_model(config, client_index)
  tokenizer = workload.load_tokenizer(config.models.tokenizer_dir)
  fingerprint = edge_tokenizer(config)
  engine = build_draft_engine(config, tokenizer=fingerprint)
  metrics = prometheus.EdgeMetrics()
  # Events feed /metrics; without a log file none are kept in memory (a server runs for days).
  log = EventLog(events_path, "specedge", keep_in_memory=False)
  log.add_listener(metrics.observe)
  tags = {"run_id": run_id} if run_id else {}
  name = model_name or served_model_name(config)
  async with _channel(server_address, security) as channel:
    # The API opens once the verifier serves (a request before would wait for it anyway).
    await wait_for_serving(channel, server_address, connect_timeout_s)
    drafter = Drafter(engine, channel,
                      _drafter_config(config, client_index, tokenizer=fingerprint),
                      event_log=log, event_tags=tags)
    metrics.set_gauge_sources(free_slots=lambda: drafter.stats()["free_slots"],
                              running=lambda: drafter.stats()["running"],
                              queued=lambda: drafter.stats()["queued"])
    await drafter.start()
    app = http_api.create_app(drafter, tokenizer, model_name=name, api_keys=api_keys,
                              metrics=metrics)
    server = await http_api.serve(app, http_host, http_port, port_file=http_port_file)
    _log.info("edge %d serving the OpenAI API at http://%s:%d/v1 (model %r) and the chat page "
              "at http://%s:%d/", client_index, http_host, server.port, name, http_host,
              server.port)
    if on_ready is not None:
      on_ready(server.port)
    stop = stop or _stop_on_signals()
    try:
      await stop.wait()
    finally:
      _log.info("edge %d: stopping the HTTP API", client_index)
      await server.shutdown()
      await drafter.stop()
      log.close()


def served_model_name(config: ServingConfig) -> str:
  """The model id the HTTP API serves: the config's name and the target folder's."""
  target = os.path.basename(os.path.normpath(config.models.target))
  return f"{config.name}-{target}" if config.name else target


def _stop_on_signals() -> asyncio.Event:
  stop = asyncio.Event()
  loop = asyncio.get_running_loop()
  for sig in (signal.SIGINT, signal.SIGTERM):
    loop.add_signal_handler(sig, stop.set)
  return stop


def run_server_only(config: ServingConfig, kind: str, *, events_path: str | None = None,
                    run_id: str | None = None, on_progress=None) -> list[RequestOutput]:
  """The server-only baseline on the config's workload (all of it, on this process)."""
  requests = workload.server_only_requests(config)  # the union of the drafters' requests
  target = build_target_engine(config)
  draft = None
  if kind == "speculative":
    # The reference's server-only SpecExec drafts without proactive trees: a server has no
    # network wait to fill, so they would only add server time to the baseline.
    no_proactive = dataclasses.replace(
        config, proactive=dataclasses.replace(config.proactive, mode="disabled"))
    draft = build_draft_engine(no_proactive, num_slots=config.server.max_batch_size)
  log = event_log(events_path, baselines.SYSTEM_NAMES[kind])
  try:
    return baselines.run_baseline(
        kind, target, requests, max_new_tokens=config.workload.max_new_tokens,
        sampling=config.workload.sampling, seed=config.workload.seed, draft=draft,
        event_log=log, event_tags={"run_id": run_id} if run_id else None,
        on_progress=on_progress)
  finally:
    if log is not None:
      log.close()
