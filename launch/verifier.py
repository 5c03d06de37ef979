"""Runs the SpecEdge verifier: the target model behind the specedge.v1.Verifier gRPC service.

  python -m launch.verifier                                  # embedded models, 127.0.0.1:50051
  python -m launch.verifier --config=configs/qwen3_14b_1_7b.py --host=0.0.0.0 --port=50051

Serves until SIGINT/SIGTERM. See specedge_jax/serving/verifier.py for threads and batching.
"""

import asyncio
import logging

from absl import app, flags

from launch import serving_flags
from specedge_jax.serving import runners

_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on (0.0.0.0: all).")
_PORT = flags.DEFINE_integer("port", 50051, "Port; 0 picks a free one.")
_PORT_FILE = flags.DEFINE_string("port_file", None, "Write the bound port here once serving.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  serving_flags.setup_process()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  asyncio.run(runners.serve_verifier(
      serving_flags.serving_config(), host=_HOST.value, port=_PORT.value,
      port_file=_PORT_FILE.value, events_path=serving_flags.EVENT_LOG.value,
      run_id=serving_flags.RUN_ID.value))


if __name__ == "__main__":
  app.run(main)
