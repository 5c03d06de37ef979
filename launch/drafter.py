"""Runs one SpecEdge edge drafter: the draft model, K interleaved requests, one verifier.

  python -m launch.drafter --server=127.0.0.1:50051 --client_index=0
  python -m launch.drafter --config=configs/qwen3_14b_1_7b.py --server=SERVER:50051 \
      --client_index=3 --config.edge.num_drafters=8 --stream

Serves share `client_index` of `edge.num_drafters` of the workload (round-robin) and exits.
Exits with status 1 if any request failed.
"""

import asyncio
import logging
import sys

from absl import app, flags

from launch import serving_flags
from specedge_jax.serving import runners

_SERVER = flags.DEFINE_string("server", "127.0.0.1:50051", "The verifier's host:port.")
_CLIENT_INDEX = flags.DEFINE_integer("client_index", 0, "This drafter's share of the workload.")
_STREAM = flags.DEFINE_bool("stream", False, "Print tokens as they are accepted.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  serving_flags.setup_process()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  on_tokens = None
  if _STREAM.value:
    on_tokens = lambda request_id, tokens, finished: print(
        f"{request_id}: {tokens}{' <end>' if finished else ''}", flush=True)
  outputs = asyncio.run(runners.run_drafter(
      serving_flags.serving_config(), _SERVER.value, client_index=_CLIENT_INDEX.value,
      events_path=serving_flags.EVENT_LOG.value, run_id=serving_flags.RUN_ID.value,
      on_tokens=on_tokens))
  failed = [o for o in outputs if o.finish_reason == "error"]
  for output in outputs:
    print(f"{output.request_id}: {len(output.tokens)} tokens in {output.steps} steps "
          f"({output.finish_reason}{': ' + output.error if output.error else ''})")
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
