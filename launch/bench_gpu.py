"""The verifier at the paper's scale on one GPU: one prepared run, JSON + PNG.

  python -m launch.bench_gpu --quick                   # Qwen3-14B/1.7B shapes, ~4-6 min on H200
  python -m launch.bench_gpu                           # --profile=full: the whole grid
  python -m launch.bench_gpu --profile=tiny --out_dir=/tmp/bgpu   # small shapes, CPU test

Random bf16 weights of the target and draft shapes are drawn on the device; the run times the
target's verify step over T (tree tokens) x B (batch), the decode step of both models, reports
MBU against the device's peak bandwidth, the per-layer weight copies in the compiled HLO
(layerwise vs stacked scan), the embedded pair's acceptance by tree size and its bf16 greedy
agreement, and a SpecEdge vs server-only throughput comparison that REPLAYS that acceptance onto
the measured step times. Every section lands in `<out_dir>/bench_gpu.json` as soon as it is
done. On a leased device run `--quick` with a timeout that leaves room for a rerun, and pass
`--compilation_cache_dir=/tmp/jax_cache` so that a rerun on the same machine skips compiles.
Exit status 1 when a section failed (its error is in the JSON). See specedge_jax/bench/gpu.py.
"""

import sys

from absl import app, flags

_PROFILE = flags.DEFINE_enum("profile", "full", ["full", "quick", "tiny"],
                             "full: T (1,8,16,32,64) x B (1,4,8,16); quick: T (1,8,32) x B (1,8); "
                             "tiny: small shapes for a CPU run.")
_QUICK = flags.DEFINE_bool("quick", False, "Alias of --profile=quick.")
_OUT_DIR = flags.DEFINE_string("out_dir", None,
                               "Output folder (default: results/gpu/<device>-<profile>).")
_PEAK_BW = flags.DEFINE_float("peak_bw_gbs", None,
                              "Peak memory bandwidth in GB/s (default: by device kind; none on "
                              "CPU, where MBU is then n/a).")
_ACCEPTANCE_JSON = flags.DEFINE_string(
    "acceptance_json", None, "Replay acceptance from this JSON (a bench_gpu.json, or "
    "{T: tokens per verify}) instead of measuring the embedded pair.")
_SECTIONS = flags.DEFINE_list("sections", [], "Run only these sections (default: all): device, "
                              "models, verify_grid, hlo, draft_decode, acceptance, replay, "
                              "bf16_agreement.")
_TREE_SIZES = flags.DEFINE_list("tree_sizes", [], "Override the profile's T (must include 1).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", [], "Override the profile's B.")
_REPEATS = flags.DEFINE_integer("repeats", None, "Override the profile's timed calls per point.")
_PREFIX_LEN = flags.DEFINE_integer("prefix_len", None, "Override the committed rows per lane.")
_TARGET_CONFIG = flags.DEFINE_string("target_config", None,
                                     "HF config.json of the target shape (default: the "
                                     "profile's, configs/hf/qwen3_14b.json).")
_DRAFT_CONFIG = flags.DEFINE_string("draft_config", None,
                                    "HF config.json of the draft shape (default: "
                                    "configs/hf/qwen3_1_7b.json).")
_CACHE_DIR = flags.DEFINE_string("compilation_cache_dir", None,
                                 "JAX persistent compilation cache folder (reruns skip compiles).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  from specedge_jax.bench import gpu

  if _CACHE_DIR.value:
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  name = "quick" if _QUICK.value else _PROFILE.value
  profile = gpu.make_profile(
      name, target_config=_TARGET_CONFIG.value, draft_config=_DRAFT_CONFIG.value,
      tree_sizes=tuple(int(t) for t in _TREE_SIZES.value) or None,
      batch_sizes=tuple(int(b) for b in _BATCH_SIZES.value) or None, repeats=_REPEATS.value,
      prefix_len=_PREFIX_LEN.value)
  out_dir = _OUT_DIR.value or gpu.default_out_dir(jax.devices()[0].device_kind, name)
  data = gpu.run(gpu.Options(profile=profile, out_dir=out_dir, peak_bw_gbs=_PEAK_BW.value,
                             acceptance_json=_ACCEPTANCE_JSON.value,
                             sections=tuple(_SECTIONS.value)))
  if data["errors"]:
    print(f"sections with errors: {sorted(data['errors'])} (see the JSON)", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
