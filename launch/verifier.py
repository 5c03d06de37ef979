"""Runs the SpecEdge verifier: the target model behind the specedge.v1.Verifier gRPC service.

  python -m launch.verifier --allow_insecure           # embedded models, plaintext 127.0.0.1:50051
  python -m launch.verifier --config=configs/qwen3_14b_1_7b.py --host=0.0.0.0 --port=50051 \
      --tls_cert=server.pem --tls_key=server.key --auth_tokens=tokens.json [--tls_client_ca=ca.pem]

Plaintext needs --allow_insecure. --auth_tokens is a JSON object {"client name": "token"}; every
call but the health service must then carry its client's token. See serving/security.py
(`make_test_pki`, `make_tokens` write a test CA, certificates and tokens).

--metrics_port serves Prometheus metrics (`specedge_` names; measure/prometheus.py).

--mesh_shape=model=4 shards the target over 4 devices (models/sharding.py). Before loading any
weight the memory planner (engine/memory_plan.py) prints per-device bytes and refuses, with what
would fit, a configuration over the devices' memory.

Serves until SIGINT/SIGTERM. See specedge_jax/serving/verifier.py for threads and batching.
"""

import asyncio
import dataclasses
import logging
import os
import sys

from absl import app, flags

from launch import serving_flags
from specedge_jax.engine import memory_plan
from specedge_jax.models import sharding
from specedge_jax.serving import io_threads, processes, runners, security

_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on (0.0.0.0: all).")
_PORT = flags.DEFINE_integer("port", 50051, "Port; 0 picks a free one.")
_PORT_FILE = flags.DEFINE_string("port_file", None, "Write the bound port here once serving.")
_TLS_CERT = flags.DEFINE_string("tls_cert", "", "TLS server certificate chain (PEM).")
_TLS_KEY = flags.DEFINE_string("tls_key", "", "The TLS certificate's private key (PEM).")
_TLS_CLIENT_CA = flags.DEFINE_string(
    "tls_client_ca", "", "Require client certificates signed by this CA (mutual TLS).")
_AUTH_TOKENS = flags.DEFINE_string(
    "auth_tokens", "", 'Per-client bearer tokens, a JSON file {"client name": "token", ...}.')
_METRICS_PORT = flags.DEFINE_integer(
    "metrics_port", None, "Serve Prometheus metrics at http://<metrics_host>:<port>/metrics "
    "(0 picks a free port); unset: no metrics endpoint.")
_METRICS_HOST = flags.DEFINE_string("metrics_host", "127.0.0.1",
                                    "Interface of the metrics endpoint.")
_IO_CPUS = flags.DEFINE_string(
    "io_cpus", "", "Once serving, move the network threads (gRPC's, the asyncio loop) to these "
    "cores, keeping XLA's compute on --cpus (serving/io_threads.py), e.g. --cpus=0 --io_cpus=1.")
_MESH_SHAPE = flags.DEFINE_string(
    "mesh_shape", None, "Shard the target over devices: 'model=N' (tensor parallelism over "
    "heads and the MLP, KV cache over kv heads) or 'data=D,model=N' (slots split over D); "
    "overrides --config.server.mesh_shape. Unset: the config's (default one device).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:  # checked before the model loads
    server_security = security.ServerSecurity(
        cert_file=_TLS_CERT.value, key_file=_TLS_KEY.value, client_ca_file=_TLS_CLIENT_CA.value,
        tokens_file=_AUTH_TOKENS.value, allow_insecure=serving_flags.ALLOW_INSECURE.value)
    server_security.require_allowed()
  except security.SecurityConfigError as e:
    raise app.UsageError(str(e)) from None
  config = serving_flags.serving_config()
  if _MESH_SHAPE.value is not None:
    try:
      config = dataclasses.replace(
          config, server=dataclasses.replace(config.server, mesh_shape=_MESH_SHAPE.value))
    except ValueError as e:
      raise app.UsageError(f"--mesh_shape: {e}") from None
  try:
    io_cpus = processes.parse_cpus(_IO_CPUS.value)
    if io_cpus:
      io_threads.check_io_cpus(io_cpus)
  except ValueError as e:
    raise app.UsageError(f"--io_cpus: {e}") from None
  serving_flags.setup_process()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  try:
    asyncio.run(runners.serve_verifier(
        config, host=_HOST.value, port=_PORT.value,
        port_file=_PORT_FILE.value, events_path=serving_flags.EVENT_LOG.value,
        run_id=serving_flags.RUN_ID.value, security=server_security,
        metrics_port=_METRICS_PORT.value, metrics_host=_METRICS_HOST.value, io_cpus=io_cpus))
  except (memory_plan.MemoryPlanError, sharding.MeshError) as e:  # before any weight was read

    sys.exit(f"verifier: {e}")
  # Served and shut down: the server is stopped and the event log closed. Leave without the
  # interpreter's teardown, whose C++ static destructors of torch (loaded by transformers with
  # the tokenizer) take ~2 s of CPU to unregister its operators: time a local run's drafters,
  # exiting meanwhile on the same cores, waited for (the stop phase went from ~2.0 s to ~1.2 s).
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main)
