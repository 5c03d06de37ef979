"""THE main job: a verifier and N drafters on this machine, with the embedded models and prompts.

  python -m launch.local
  python -m launch.local --config.edge.num_drafters=4 --baselines=autoregressive
  python -m launch.local --verifier_cpus=0 --drafter_cpus=1 --config.edge.simulated_rtt_ms=14

Starts `launch.verifier` and `edge.num_drafters` x `launch.drafter` as child processes, shows
progress, and prints the run summary (tokens/s, inter-token latency, accepted tokens per step,
server throughput). Ctrl-C stops every child. Events, logs and summary.json go to --out_dir.
The verifier and drafters talk over mutual TLS with one bearer token per drafter, from a test CA
written into <out_dir>/security/; --insecure_local runs them in plaintext instead.
"""

import os
import time

from absl import app, flags

from launch import serving_flags
from specedge_jax.serving import local, processes

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Run folder; default runs/local-<time>.")
_VERIFIER_CPUS = flags.DEFINE_string("verifier_cpus", "", "Pin the verifier (and baselines).")
_DRAFTER_CPUS = flags.DEFINE_string("drafter_cpus", "", "Pin the drafters.")
_BASELINES = flags.DEFINE_list("baselines", [], "Server-only runs to compare: autoregressive, "
                               "speculative.")
_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", local.LocalOptions.compilation_cache_dir,
    "JAX persistent compilation cache shared by the children; '' disables it.")
_INSECURE_LOCAL = flags.DEFINE_bool(
    "insecure_local", False, "Plaintext gRPC without tokens between the local verifier and "
    "drafters (default: mutual TLS and tokens from a test CA in <out_dir>/security/).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out_dir = _OUT_DIR.value or os.path.join("runs", time.strftime("local-%Y%m%d-%H%M%S"))
  options = local.LocalOptions(
      out_dir=out_dir, verifier_cpus=processes.parse_cpus(_VERIFIER_CPUS.value),
      drafter_cpus=processes.parse_cpus(_DRAFTER_CPUS.value), baselines=tuple(_BASELINES.value),
      compilation_cache_dir=_COMPILATION_CACHE_DIR.value, insecure=_INSECURE_LOCAL.value)
  result = local.run_local(serving_flags.serving_config(), options)
  local.print_summary(result)


if __name__ == "__main__":
  app.run(main)
