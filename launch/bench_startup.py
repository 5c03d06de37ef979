"""Times the start-up of the main job, per process and phase, with a cold and a warm XLA cache.

  python -m launch.bench_startup                        # cold run, then warm run, one table
  python -m launch.bench_startup --runs=warm,warm       # two runs on ~/.cache/specedge_jax/xla
  python -m launch.bench_startup --importtime           # + import seconds of heavy packages
  python -m launch.bench_startup --local_flag=--verifier_cpus=0 --local_flag=--drafter_cpus=1
  python -m launch.bench_startup --repo_root=/path/to/other/checkout   # another version

Each run is `python -m launch.local --out_dir=<out_dir>/<run> --compilation_cache_dir=...` in a
subprocess, as a new user would start it. A cold run uses a fresh, empty cache folder under
--out_dir; a warm run reuses the cache of the cold run before it (or --warm_cache_dir when no
cold run came first). See specedge_jax/bench/startup.py for what each phase covers.
"""

import os
import tempfile

from absl import app, flags

from specedge_jax.bench import startup

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the runs go (default: a fresh temp dir).")
_RUNS = flags.DEFINE_list("runs", ["cold", "warm"], "Runs in order: 'cold' and/or 'warm'.")
_WARM_CACHE_DIR = flags.DEFINE_string(
    "warm_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "specedge_jax", "xla"),
    "The cache a warm run uses when no cold run came before it.")
_IMPORTTIME = flags.DEFINE_bool("importtime", False, "Run every process under "
                                "PYTHONPROFILEIMPORTTIME and report heavy imports.")
_LOCAL_FLAGS = flags.DEFINE_multi_string("local_flag", [], "A flag passed on to launch.local.")
_OUT_JSON = flags.DEFINE_string("out_json", None, "Also write every run's trace here.")
_REPO_ROOT = flags.DEFINE_string(
    "repo_root", os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "The checkout whose launch.local runs (another one: to compare two versions).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out_dir = _OUT_DIR.value or tempfile.mkdtemp(prefix="bench_startup-")
  traces = startup.run(out_dir=out_dir, repo_root=_REPO_ROOT.value, runs=_RUNS.value,
                       warm_cache_dir=_WARM_CACHE_DIR.value, extra_flags=_LOCAL_FLAGS.value,
                       importtime=_IMPORTTIME.value, out_json=_OUT_JSON.value)
  print(f"runs in {out_dir}")
  if any(t.returncode != 0 for t in traces):
    raise SystemExit(1)


if __name__ == "__main__":
  app.run(main)
