"""`serving/health_wait.py`: the wait returns once the service is SERVING, and times out with a
message naming the server, its address and the last RPC error."""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from specedge_jax.serving.health_wait import wait_until_serving


def test_waits_for_serving_and_times_out_naming_the_server():
  async def main():
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    try:
      await servicer.set("svc", health_pb2.HealthCheckResponse.NOT_SERVING)
      async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(TimeoutError, match=f"no SERVING tail at {address} after 0 s"):
          await wait_until_serving(channel, "svc", what="tail", address=address,
                                   timeout_s=0.3, poll_s=0.05)
        # An unknown service is an RPC error (NOT_FOUND), kept for the message.
        with pytest.raises(TimeoutError, match="last error: NOT_FOUND"):
          await wait_until_serving(channel, "other", what="tail", address=address,
                                   timeout_s=0.2, poll_s=0.05)

        async def serve_soon():
          await asyncio.sleep(0.2)
          await servicer.set("svc", health_pb2.HealthCheckResponse.SERVING)

        setter = asyncio.ensure_future(serve_soon())
        await wait_until_serving(channel, "svc", what="tail", address=address, timeout_s=10.0,
                                 poll_s=0.05)
        await setter
    finally:
      await server.stop(None)

  asyncio.run(main())
