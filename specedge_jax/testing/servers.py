"""A verifier in front of a (fake) engine on a free loopback port, for tests: one helper instead
of one per test file. Loads no JAX."""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

import grpc

from specedge_jax import api
from specedge_jax.serving.proto import specedge_pb2_grpc
from specedge_jax.serving.verifier import VerifierServer


@contextlib.asynccontextmanager
async def running_verifier(engine: api.TargetEngineProtocol, **server_kwargs
                           ) -> AsyncIterator[tuple[VerifierServer, grpc.aio.Channel,
                                                    specedge_pb2_grpc.VerifierStub]]:
  """(server, plaintext channel to it, stub) on 127.0.0.1; everything is stopped on exit."""
  server = VerifierServer(engine, **server_kwargs)
  port = await server.start("127.0.0.1:0")
  channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
  try:
    yield server, channel, specedge_pb2_grpc.VerifierStub(channel)
  finally:
    await channel.close()
    await server.stop(grace=None)
