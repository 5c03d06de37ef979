"""THE main job: a verifier and N drafters on this machine, with the embedded models and prompts.

  python -m launch.local
  python -m launch.local --config.edge.num_drafters=4 --baselines=autoregressive
  python -m launch.local --verifier_cpus=0 --drafter_cpus=1 --config.edge.simulated_rtt_ms=14
  python -m launch.local --serve [--http_port=8000 --http_host=127.0.0.1]
  python -m launch.local --reference_yaml=specedge.example.yaml   # a reference config file
  python -m launch.local --netns [--netns_rtt_ms=14 --netns_jitter_ms=1 --netns_loss_pct=0.1]
  python -m launch.local --netns --netns_rtts=5,14,40 --config.edge.num_drafters=3
  python -m launch.local --config.models.drafts="('specedge_jax/data/assets/models/draft', \
      'specedge_jax/data/assets/models/draft_small')"    # drafter i runs drafts[i % 2]

Starts `launch.verifier` and `edge.num_drafters` x `launch.drafter` as child processes, shows
progress, and prints the run summary (tokens/s, inter-token latency, accepted tokens per step,
server throughput). Ctrl-C stops every child. Events, logs and summary.json go to --out_dir.
With --serve, one drafter serves the OpenAI-compatible HTTP API and a chat page instead (the URLs
are printed) until Ctrl-C; no workload, baselines or summary.
The verifier and drafters talk over mutual TLS with one bearer token per drafter, from a test CA
written into <out_dir>/security/; --insecure_local runs them in plaintext instead.
With --netns (root or CAP_NET_ADMIN) the verifier and each drafter run in network namespaces of
their own over links with a real RTT, jitter and loss (serving/netns.py; tc netem, or a TUN
relay where the kernel has no netem); edge.simulated_rtt_ms is then 0.
"""

import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags
from rich.console import Console

from launch import serving_flags
from specedge_jax.serving import local, netns, processes, reference_config

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Run folder; default runs/local-<time>.")
_REFERENCE_YAML = flags.DEFINE_string(
    "reference_yaml", None, "A reference specedge YAML file instead of --config "
    "(serving/reference_config.py); --config.<path>=value flags override it.")
_VERIFIER_CPUS = flags.DEFINE_string("verifier_cpus", "", "Pin the verifier (and baselines).")
_VERIFIER_IO_CPUS = flags.DEFINE_string(
    "verifier_io_cpus", "", "Move the verifier's network threads (gRPC, its asyncio loop) to "
    "these cores once it serves; its compute stays on --verifier_cpus.")
_DRAFTER_CPUS = flags.DEFINE_string("drafter_cpus", "", "Pin the drafters.")
_BASELINES = flags.DEFINE_list("baselines", [], "Server-only runs to compare: autoregressive, "
                               "speculative.")
_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", local.LocalOptions.compilation_cache_dir,
    "JAX persistent compilation cache shared by the children; '' disables it.")
_INSECURE_LOCAL = flags.DEFINE_bool(
    "insecure_local", False, "Plaintext gRPC without tokens between the local verifier and "
    "drafters (default: mutual TLS and tokens from a test CA in <out_dir>/security/).")
_SERVE = flags.DEFINE_bool("serve", False, "Serve the OpenAI-compatible HTTP API and a chat page "
                           "from one drafter until Ctrl-C, instead of replaying the workload.")
_HTTP_PORT = flags.DEFINE_integer("http_port", local.LocalOptions.http_port,
                                  "--serve: the HTTP port (0 picks a free one).")
_HTTP_HOST = flags.DEFINE_string("http_host", local.LocalOptions.http_host,
                                 "--serve: the HTTP interface (0.0.0.0: all).")
_NETNS = flags.DEFINE_bool(
    "netns", False, "Run the verifier and each drafter in a network namespace of its own, over "
    "links with a real RTT (needs root or CAP_NET_ADMIN); sets edge.simulated_rtt_ms to 0.")
_NETNS_RTT_MS = flags.DEFINE_float("netns_rtt_ms", netns.NetnsConfig.rtt_ms,
                                   "--netns: round-trip time of every drafter's link (ms).")
_NETNS_JITTER_MS = flags.DEFINE_float("netns_jitter_ms", netns.NetnsConfig.jitter_ms,
                                      "--netns: uniform +- jitter of each direction (ms).")
_NETNS_LOSS_PCT = flags.DEFINE_float("netns_loss_pct", netns.NetnsConfig.loss_pct,
                                     "--netns: packet loss of each direction (percent).")
_NETNS_RTTS = flags.DEFINE_list("netns_rtts", [], "--netns: one RTT per drafter (ms), e.g. "
                                "5,14,40, instead of --netns_rtt_ms.")
_NETNS_SHAPER = flags.DEFINE_enum(
    "netns_shaper", netns.NetnsConfig.shaper, netns.SHAPERS, "--netns: tc netem, a userspace "
    "TUN relay (kernels without sch_netem), or auto (netem where available).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    config, fields = serving_flags.serving_config(), {}
    if _REFERENCE_YAML.value:  # its notes are logged; its result folder unless --out_dir
      config, fields = reference_config.to_local(reference_config.load_reference_yaml(
          _REFERENCE_YAML.value), config_flags.get_override_values(flags.FLAGS["config"]))
    out_dir = _OUT_DIR.value or fields.get("out_dir") or os.path.join(
        "runs", time.strftime("local-%Y%m%d-%H%M%S"))
    netns_config = None
    if _NETNS.value:
      try:
        rtts = tuple(float(rtt) for rtt in _NETNS_RTTS.value)
      except ValueError:
        raise ValueError(f"--netns_rtts: expected numbers, got {_NETNS_RTTS.value}") from None
      netns_config = netns.NetnsConfig(
          rtt_ms=_NETNS_RTT_MS.value, jitter_ms=_NETNS_JITTER_MS.value,
          loss_pct=_NETNS_LOSS_PCT.value, drafter_rtts_ms=rtts, shaper=_NETNS_SHAPER.value)
    options = local.LocalOptions(
        out_dir=out_dir, verifier_cpus=processes.parse_cpus(_VERIFIER_CPUS.value),
        verifier_io_cpus=processes.parse_cpus(_VERIFIER_IO_CPUS.value),
        drafter_cpus=processes.parse_cpus(_DRAFTER_CPUS.value),
        baselines=tuple(_BASELINES.value), compilation_cache_dir=_COMPILATION_CACHE_DIR.value,
        insecure=_INSECURE_LOCAL.value, serve=_SERVE.value, http_port=_HTTP_PORT.value,
        http_host=_HTTP_HOST.value, netns=netns_config)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  console = Console()
  try:
    result = local.run_local(config, options, console)
  except (local.ChildFailed, netns.NetnsError) as e:
    # A child's log tail can hold brackets: printed as text, not as rich markup.
    message = f"--netns: {e}" if isinstance(e, netns.NetnsError) else str(e)
    console.print(message, style="red", markup=False, highlight=False, soft_wrap=True)
    sys.exit(1)
  if not options.serve:
    local.print_summary(result, console)


if __name__ == "__main__":
  app.run(main)
