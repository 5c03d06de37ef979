"""The verifier server: a grpc.aio server in front of one target engine, batching all sessions.

What this module owns: the server's lifecycle (bind, start, health, reaper task, graceful stop)
and the wiring of its three parts, one module each:

  servicer.py       the `specedge.v1.Verifier` handlers on the event loop: sessions, validation,
                    gRPC statuses (loads no JAX);
  engine_worker.py  the engine thread: the only caller of the engine, with the batching policy;
  owner_thread.py   how a result computed on an owner thread reaches the event loop.

The standard gRPC health service reports SERVING for "" and `specedge.v1.Verifier` while the
server runs, and NOT_SERVING once it is stopping. Clients come and go: there is no fixed client
count and no barrier.

Transport security (`security.py`): with a `ServerSecurity` the port is TLS (mutual TLS with a
client CA), or plaintext only if it allows that; with a tokens file every call but the health
service needs a client's bearer token (an interceptor refuses the rest with UNAUTHENTICATED) and
the servicer learns the caller's name through `identify`. `security=None` keeps the old
behaviour: a plaintext port and no authentication (in-process tests).
"""

from __future__ import annotations

import asyncio
from typing import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from specedge_jax import api
from specedge_jax.data.tokenizer_fingerprint import TokenizerFingerprint
from specedge_jax.measure.events import EventLog
from specedge_jax.serving.engine_worker import EngineWorker, PrefillCache
from specedge_jax.serving import security as security_lib
from specedge_jax.serving.serving_config import BatchingConfig
from specedge_jax.serving.slo_admission import SloAdmission
from specedge_jax.serving.speculation_controller import SpeculationController
from specedge_jax.serving.servicer import SERVICE_NAME, EngineLimits, VerifierServicer
from specedge_jax.serving.verify_time import VerifyTimeEstimator



class VerifierServer:
  """A grpc.aio server with the Verifier and health services, and its engine thread.

  Usage (inside a running event loop):

      server = VerifierServer(engine, batching=BatchingConfig(mode="dynamic"))
      port = await server.start("127.0.0.1:0")
      ...
      await server.stop()
  """

  def __init__(self, engine: api.TargetEngineProtocol, *,
               batching: BatchingConfig = BatchingConfig(),
               tokenizer=None, tokenizer_fingerprint: TokenizerFingerprint | None = None,
               eos_token_ids: Sequence[int] | None = None,
               event_log: EventLog | None = None, prefill_cache_entries: int = 0,
               session_timeout_s: float = 30.0, max_sessions_per_client: int = 0,
               admission_queue: int = 0, admission_wait_s: float = 10.0,
               limits: EngineLimits | None = None,
               security: security_lib.ServerSecurity | None = None,
               verify_time: VerifyTimeEstimator | None = None,
               controller: SpeculationController | None = None,
               slo_admission: SloAdmission | None = None):
    """`session_timeout_s` is a session's lease: a session with no call for that long is closed
    and its slot freed. `max_sessions_per_client` (0: none) caps the sessions one client holds.
    Opens beyond the slots wait, first come first served, in a queue of `admission_queue` places
    for up to `admission_wait_s` (0 places: refused at once, with a retry-after hint).
    `tokenizer_fingerprint` (the target's tokenizer; `runners.serve_verifier` passes it) makes
    opens from edges with another tokenizer fail with FAILED_PRECONDITION. `controller` (the
    speculation controller) advises each session's next tree in every answer. `slo_admission`
    holds fewer sessions than slots while their measured ITL misses their SLOs."""
    self.engine = engine
    self.security = security  # None: plaintext, no authentication (the old behaviour)
    self.limits = limits or EngineLimits.of(engine)
    self.batching = batching
    self._tokenizer = tokenizer
    self._tokenizer_fingerprint = tokenizer_fingerprint
    self._eos_token_ids = tuple(eos_token_ids if eos_token_ids is not None else
                                sorted(engine.eos_token_ids))
    self.event_log = event_log
    self._prefill_cache = PrefillCache(prefill_cache_entries) if prefill_cache_entries else None
    # The forward-time estimator of batching mode 'slo' (None: in memory, default seed).
    self.verify_time = verify_time
    self.controller = controller
    self.slo_admission = slo_admission
    self._session_timeout_s = session_timeout_s
    self._max_sessions_per_client = max_sessions_per_client
    self._admission = (admission_queue, admission_wait_s)
    self._server: grpc.aio.Server | None = None
    self._health: health.aio.HealthServicer | None = None
    self.worker: EngineWorker | None = None
    self.servicer: VerifierServicer | None = None
    self._reaper: asyncio.Task | None = None
    self.port: int | None = None

  async def start(self, address: str = "127.0.0.1:0") -> int:
    """Starts serving on address ('host:port'; port 0 picks a free one). Returns the port."""
    # Refused configs (plaintext without allow_insecure) fail here, before a thread is started.
    credentials, authenticator = None, None
    if self.security is not None:
      credentials = security_lib.server_credentials(self.security)
      authenticator = security_lib.Authenticator.from_security(self.security)
    loop = asyncio.get_running_loop()
    self.worker = EngineWorker(self.engine, loop=loop, batching=self.batching,
                               max_batch_size=self.limits.max_batch_size,
                               event_log=self.event_log, prefill_cache=self._prefill_cache,
                               verify_time=self.verify_time)
    self.servicer = VerifierServicer(self.worker, self.limits, tokenizer=self._tokenizer,
                                     tokenizer_fingerprint=self._tokenizer_fingerprint,
                                     eos_token_ids=self._eos_token_ids,
                                     max_sessions_per_client=self._max_sessions_per_client,
                                     admission_queue=self._admission[0],
                                     admission_wait_s=self._admission[1],
                                     identify=authenticator.client_of if authenticator else None,
                                     controller=self.controller,
                                     slo_admission=self.slo_admission)
    # Trees of max_tree_nodes int32 tokens and parents are small; 16 MiB leaves ample room while
    # still refusing absurd messages before they are parsed.
    interceptors = [authenticator.interceptor()] if authenticator is not None else []
    self._server = grpc.aio.server(interceptors=interceptors,
                                   options=[("grpc.max_receive_message_length", 16 << 20)])
    self._server.add_generic_rpc_handlers((self.servicer.rpc_handlers(),))
    self._health = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
    if credentials is not None:
      self.port = self._server.add_secure_port(address, credentials)
    else:  # security None (the old default) or a config that allows plaintext
      self.port = self._server.add_insecure_port(address)
    if not self.port:
      raise OSError(f"cannot bind the verifier to {address}")
    self.worker.start()
    await self._server.start()
    for service in ("", SERVICE_NAME):
      await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
    self._reaper = asyncio.create_task(self._reap_forever(self.servicer))
    return self.port

  async def _reap_forever(self, servicer: VerifierServicer) -> None:
    # Often enough that a slot comes back within about a quarter lease of the lease's end.
    period = max(0.02, min(1.0, self._session_timeout_s / 4))
    while True:
      await asyncio.sleep(period)
      await servicer.reap_idle_sessions(self._session_timeout_s)

  async def drain(self, timeout_s: float) -> int:
    """Going away: health turns NOT_SERVING, new sessions get UNAVAILABLE (a drafter retries
    that, and resumes its requests on whatever serves this address next), and the open
    sessions are served until they end or `timeout_s` passes. Returns the sessions still open;
    `stop` then hands their rounds back (UNAVAILABLE), and their drafters resume them."""
    if self.servicer is None or self._health is None:
      raise RuntimeError("VerifierServer.drain() before start()")
    self.servicer.draining = True
    await self._health.enter_graceful_shutdown()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while self.servicer.sessions and loop.time() < deadline:
      await asyncio.sleep(0.02)
    return len(self.servicer.sessions)

  async def stop(self, grace: float | None = 1.0) -> None:
    if self._server is None:
      return
    if self._health is not None:
      await self._health.enter_graceful_shutdown()
    if self._reaper is not None:
      self._reaper.cancel()
    await self._server.stop(grace)
    if self.worker is None:  # start() makes the worker before the server
      raise RuntimeError("VerifierServer: a server without an engine worker")
    # Joining the engine thread blocks; do it off the loop so late deliveries cannot deadlock.
    await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)
    self._server = None

  async def wait_for_termination(self) -> None:
    if self._server is None:
      raise RuntimeError("VerifierServer.wait_for_termination() before start() or after stop()")
    await self._server.wait_for_termination()

  @property
  def prefill_cache(self) -> PrefillCache | None:
    return self._prefill_cache
