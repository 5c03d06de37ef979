"""Waiting for a gRPC server's health service to say SERVING: the one loop that the drafters
(the verifier's `specedge.v1.Verifier`) and the layer-split head (its tail's service) share."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


async def wait_until_serving(channel: grpc.aio.Channel, service: str, *, what: str,
                             address: str, timeout_s: float, poll_s: float = 0.2) -> None:
  """Asks `service`'s health over `channel` until it is SERVING; raises TimeoutError naming
  `what` at `address` after `timeout_s`, with the last RPC error (a TLS handshake failure shows
  only there)."""
  deadline = time.monotonic() + timeout_s
  last_error = ""
  stub = health_pb2_grpc.HealthStub(channel)
  while True:
    try:
      reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
      if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return
    except grpc.aio.AioRpcError as e:
      last_error = f"; last error: {e.code().name}: {e.details()}"
    if time.monotonic() > deadline:
      raise TimeoutError(f"no SERVING {what} at {address} after {timeout_s:.0f} s{last_error}")
    await asyncio.sleep(poll_s)
