"""A loopback gRPC proxy that injects faults between clients and a server, for tests.

It forwards every call of any service as raw bytes to an upstream address and, per call, by a
seeded random draw: delays the request or the reply (so concurrent calls complete out of order),
drops the request (the server never sees it), drops the reply (the server applied the call and
the client never hears: its deadline expires), or cuts the call (UNAVAILABLE, before or after the
server saw it). It knows nothing about the verifier: faults are the network's, and whatever a
client does about them is the client's.

Listens on 127.0.0.1 only. Not for production traffic.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random

import grpc


@dataclasses.dataclass(frozen=True)
class Faults:
  """Probabilities per call (each drawn independently) and the delay range."""

  delay_p: float = 0.0  # delay the request and/or the reply by U(0, max_delay_s)
  max_delay_s: float = 0.02
  drop_request_p: float = 0.0  # never forward: the client waits for its deadline
  drop_reply_p: float = 0.0  # forward, then never answer: the server applied it
  cut_before_p: float = 0.0  # UNAVAILABLE before forwarding
  cut_after_p: float = 0.0  # UNAVAILABLE after the server answered
  hold_s: float = 30.0  # how long a dropped call is held (the client's deadline ends it first)

  def __post_init__(self):
    for name in ("delay_p", "drop_request_p", "drop_reply_p", "cut_before_p", "cut_after_p"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")


@dataclasses.dataclass
class FaultCounts:
  calls: int = 0
  delayed: int = 0
  dropped_requests: int = 0
  dropped_replies: int = 0
  cut_before: int = 0
  cut_after: int = 0

  @property
  def faults(self) -> int:
    return (self.dropped_requests + self.dropped_replies + self.cut_before + self.cut_after)


class _Forward(grpc.GenericRpcHandler):

  def __init__(self, proxy: "FaultProxy"):
    self._proxy = proxy

  def service(self, handler_call_details):
    method = handler_call_details.method

    async def forward(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
      return await self._proxy._forward(method, raw, context)

    return grpc.unary_unary_rpc_method_handler(forward)


class FaultProxy:
  """Usage (in a running event loop):

      proxy = FaultProxy("127.0.0.1:50051", Faults(drop_reply_p=0.1), seed=0)
      port = await proxy.start()
      ...  # clients connect to 127.0.0.1:port
      await proxy.stop()
  """

  def __init__(self, upstream: str, faults: Faults, *, seed: int = 0,
               channel_options: tuple = ()):
    self._upstream_address = upstream
    self.faults = faults
    self.counts = FaultCounts()
    self._random = random.Random(seed)
    self._channel_options = channel_options
    self._server: grpc.aio.Server | None = None
    self._upstream: grpc.aio.Channel | None = None
    self.port: int | None = None

  async def start(self) -> int:
    self._upstream = grpc.aio.insecure_channel(self._upstream_address,
                                               options=list(self._channel_options))
    self._server = grpc.aio.server()
    self._server.add_generic_rpc_handlers((_Forward(self),))
    self.port = self._server.add_insecure_port("127.0.0.1:0")
    await self._server.start()
    return self.port

  async def stop(self) -> None:
    if self._server is not None:
      await self._server.stop(grace=None)
    if self._upstream is not None:
      await self._upstream.close()

  def _draw(self, p: float) -> bool:
    return self._random.random() < p

  async def _delay(self) -> None:
    if self._draw(self.faults.delay_p):
      self.counts.delayed += 1
      await asyncio.sleep(self._random.uniform(0.0, self.faults.max_delay_s))

  async def _forward(self, method: str, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if self._upstream is None:
      raise RuntimeError("FaultProxy used before start()")
    faults, counts = self.faults, self.counts
    counts.calls += 1
    # Every draw is made up front, in call order, so a seed gives the same faults each run.
    cut_before, drop_request = self._draw(faults.cut_before_p), self._draw(faults.drop_request_p)
    drop_reply, cut_after = self._draw(faults.drop_reply_p), self._draw(faults.cut_after_p)
    await self._delay()
    if cut_before:
      counts.cut_before += 1
      await context.abort(grpc.StatusCode.UNAVAILABLE, "fault proxy: connection cut")
    if drop_request:
      counts.dropped_requests += 1
      await asyncio.sleep(faults.hold_s)
      await context.abort(grpc.StatusCode.UNAVAILABLE, "fault proxy: request dropped")
    metadata = tuple((key, value) for key, value in (context.invocation_metadata() or ())
                     if not key.startswith(("grpc-", ":")) and key != "user-agent")
    try:
      reply = await self._upstream.unary_unary(method)(
          raw, timeout=context.time_remaining(), metadata=metadata)
    except grpc.aio.AioRpcError as e:  # the server's own status, passed through
      await context.abort(e.code(), e.details() or "")
    if drop_reply:
      counts.dropped_replies += 1
      await asyncio.sleep(faults.hold_s)
      await context.abort(grpc.StatusCode.UNAVAILABLE, "fault proxy: reply dropped")
    if cut_after:
      counts.cut_after += 1
      await context.abort(grpc.StatusCode.UNAVAILABLE, "fault proxy: connection cut")
    await self._delay()
    return reply
