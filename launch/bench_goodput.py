"""Goodput under an ITL SLO: static SpecEdge, SpecEdge with SLO batching and the speculation
controller, and server-only autoregressive serving, over client counts; capacity; the server's
efficiency against its verify-curve bound. Tables, goodput.json and PNGs in --out_dir.

  python -m launch.bench_goodput                       # results/goodput, SLO from a pilot
  python -m launch.bench_goodput --clients=2,4 --requests_per_client=2 --itl_slo_ms=30
  python -m launch.bench_goodput --verify_curve=results/goodput/verify_curve.json
  python -m launch.bench_goodput --repeats=3 --requests_per_client=12   # with 95 % intervals
  python -m launch.bench_goodput --dry_run             # the command lines, nothing run
  python -m launch.bench_goodput --itl_slo_ms=27 --clients=4,8 \
      --systems=specedge_static,specedge_slo,specedge_slo_batching,specedge_controller
  python -m launch.bench_goodput --resummarize=results/goodput   # tables and plots again

The base config is `--config` (default configs/embedded.py, overridable field by field); each
run's changes to it are in goodput.json with the equivalent `launch.local` / `launch.server_only`
command. See specedge_jax/bench/goodput.py for the systems, the start gate and the definitions.
"""

import sys

from absl import app, flags
from rich.console import Console

from launch import serving_flags
from specedge_jax.bench import goodput
from specedge_jax.serving import netns, processes

_DEFAULTS = goodput.GoodputOptions(out_dir="results/goodput")

_OUT_DIR = flags.DEFINE_string("out_dir", _DEFAULTS.out_dir, "Results folder.")
_CLIENTS = flags.DEFINE_list("clients", [str(c) for c in _DEFAULTS.clients],
                             "Concurrent clients (drafter processes) per point.")
_REQUESTS_PER_CLIENT = flags.DEFINE_integer("requests_per_client", _DEFAULTS.requests_per_client,
                                            "Requests each drafter serves.")
_REPEATS = flags.DEFINE_integer(
    "repeats", _DEFAULTS.repeats, "Run every point this many times, pass after pass; >= 2 "
    "gives each ratio a 95 % interval.")
_REQUESTS_PER_DRAFTER = flags.DEFINE_integer(
    "requests_per_drafter", _DEFAULTS.requests_per_drafter, "K: requests interleaved on one edge.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", _DEFAULTS.max_new_tokens,
                                       "Tokens per request.")
_SOURCE = flags.DEFINE_string("source", _DEFAULTS.source, "workload.source (prompt set).")
_RTTS_MS = flags.DEFINE_list("rtts_ms", [f"{r:g}" for r in _DEFAULTS.rtts_ms],
                             "Drafter i's link RTT is rtts_ms[i % len] (ms).")
_DRAFTS = flags.DEFINE_list("drafts", list(_DEFAULTS.drafts),
                            "Drafter i runs drafts[i % len] (models.drafts).")
_NETNS = flags.DEFINE_bool("netns", _DEFAULTS.netns, "Real links in network namespaces (falls "
                           "back to a simulated mean RTT where not possible).")
_NETNS_JITTER_MS = flags.DEFINE_float("netns_jitter_ms", _DEFAULTS.netns_jitter_ms,
                                      "Uniform +- jitter of each link direction (ms).")
_NETNS_LOSS_PCT = flags.DEFINE_float("netns_loss_pct", _DEFAULTS.netns_loss_pct,
                                     "Packet loss of each link direction (percent).")
_ITL_SLO_MS = flags.DEFINE_integer("itl_slo_ms", None,
                                   "The ITL SLO; default: slo_factor x a pilot's mean ITL.")
_SLO_FACTOR = flags.DEFINE_float("slo_factor", _DEFAULTS.slo_factor,
                                 "SLO = this x static SpecEdge's mean ITL at the lowest load.")
_TREE_BUCKETS = flags.DEFINE_list("tree_buckets", [str(b) for b in _DEFAULTS.tree_buckets],
                                  "server.tree_buckets of the slo+controller runs.")
_ATTAINMENT = flags.DEFINE_float("attainment_target", _DEFAULTS.attainment_target,
                                 "Capacity: the fraction of requests that must meet the SLO.")
_VERIFIER_CPUS = flags.DEFINE_string("verifier_cpus", "0", "Pin the verifier, the baselines "
                                     "and the verify curve.")
_VERIFIER_IO_CPUS = flags.DEFINE_string(
    "verifier_io_cpus", ",".join(str(c) for c in _DEFAULTS.verifier_io_cpus),
    "The SpecEdge verifier's network threads on these cores ('': beside its compute).")
_DRAFTER_CPUS = flags.DEFINE_string("drafter_cpus", "1", "Pin the drafters (and this process).")
_SYSTEMS = flags.DEFINE_list("systems", list(goodput.SYSTEMS), "Systems to run, of "
                             f"{', '.join(goodput.ALL_SYSTEMS)} (the slo+controller ablations).")
_VERIFY_CURVE = flags.DEFINE_string("verify_curve", "", "A launch.bench_core --out_json curve "
                                    "for the bound; default: measure it in this run.")
_START_GATE = flags.DEFINE_bool("start_gate", _DEFAULTS.start_gate, "Hold each verifier until "
                                "its drafters are warm, so all clients start together.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the planned command lines and exit.")
_RESUMMARIZE = flags.DEFINE_string("resummarize", None, "Run nothing: rebuild the tables, "
                                   "goodput.json and plots of this finished folder.")
_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", _DEFAULTS.compilation_cache_dir,
    "JAX persistent compilation cache shared by the children; '' disables it.")


def _numbers(flag, convert):
  try:
    return tuple(convert(v) for v in flag.value)
  except ValueError as e:
    raise app.UsageError(f"--{flag.name}: {e}") from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Piped output (logs, notes) gets tables wide enough not to cut their columns.
  console = Console(width=None if sys.stdout.isatty() else 220)
  if _RESUMMARIZE.value:
    try:
      result = goodput.resummarize(_RESUMMARIZE.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    goodput.print_report(result, console)
    return
  base = serving_flags.serving_config()
  try:
    options = goodput.GoodputOptions(
        out_dir=_OUT_DIR.value, clients=_numbers(_CLIENTS, int),
        requests_per_client=_REQUESTS_PER_CLIENT.value, repeats=_REPEATS.value,
        requests_per_drafter=_REQUESTS_PER_DRAFTER.value, max_new_tokens=_MAX_NEW_TOKENS.value,
        source=_SOURCE.value, rtts_ms=_numbers(_RTTS_MS, float), drafts=tuple(_DRAFTS.value),
        netns=_NETNS.value, netns_jitter_ms=_NETNS_JITTER_MS.value,
        netns_loss_pct=_NETNS_LOSS_PCT.value, itl_slo_ms=_ITL_SLO_MS.value,
        slo_factor=_SLO_FACTOR.value, tree_buckets=_numbers(_TREE_BUCKETS, int),
        attainment_target=_ATTAINMENT.value,
        verifier_cpus=processes.parse_cpus(_VERIFIER_CPUS.value),
        verifier_io_cpus=processes.parse_cpus(_VERIFIER_IO_CPUS.value),
        drafter_cpus=processes.parse_cpus(_DRAFTER_CPUS.value),
        systems=tuple(_SYSTEMS.value), verify_curve=_VERIFY_CURVE.value,
        start_gate=_START_GATE.value,
        compilation_cache_dir=_COMPILATION_CACHE_DIR.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if _DRY_RUN.value:
    use_netns = options.netns and netns.check_supported() is None
    for line in goodput.planned_commands(base, options, options.itl_slo_ms, use_netns):
      print(line)
    if options.itl_slo_ms is None:
      print("# the slo+controller runs follow once the pilot has set the SLO")
    return
  result = goodput.run_goodput(base, options, console)
  goodput.print_report(result, console)


if __name__ == "__main__":
  app.run(main)
