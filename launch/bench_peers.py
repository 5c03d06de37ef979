"""Our speculative engine against PyTorch peers on the whole generation loop, batch size 1.

  python -m launch.bench_peers                       # embedded target/draft pair and prompts
  python -m launch.bench_peers --num_prompts=8 --max_new_tokens=64 --repeats=2 \
      --out_json=peers.json --plot=peers.png

Compares, on the same HF folders and prompts (see `specedge_jax/bench/peers.py`): our JAX
SpecExec engine, a plain PyTorch SpecExec implementation of the same algorithm
(`specedge_jax/bench/torch_specexec.py`), HF assisted generation, and plain greedy decoding (ours
and HF's). Prints tokens/s, tokens per target call, where the time goes, and whether every
method emitted exactly HF greedy's tokens.
"""

from absl import app, flags

from specedge_jax.data import assets

_TARGET = flags.DEFINE_string("target", assets.DEFAULT_TARGET_DIR,
                              "Target model: HF folder (both JAX and PyTorch load it).")
_DRAFT = flags.DEFINE_string("draft", assets.DEFAULT_DRAFT_DIR,
                             "Draft model: HF folder with the target's vocabulary.")
_PROMPTS = flags.DEFINE_string("prompts", assets.DEFAULT_PROMPTS, "Prompt records (JSON).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 8, "Prompts to generate for.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per prompt (at most).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed passes; each prompt keeps its best.")
_METHODS = flags.DEFINE_list("methods", None,
                             "Subset of methods to run (default: all); hf-greedy always runs.")
_N_BEAMS = flags.DEFINE_integer("max_n_beams", 32, "SpecExec nodes forwarded per step.")
_BEAM_LEN = flags.DEFINE_integer("max_beam_len", 4, "SpecExec depth.")
_BRANCH = flags.DEFINE_integer("max_branch_width", 16, "SpecExec children per node.")
_BUDGET = flags.DEFINE_integer("max_budget", 32, "SpecExec tree size (root excluded).")
_EOS = flags.DEFINE_list("eos_token_ids", None,
                         "Stop token ids for every method (default: the target config's).")
_HF_TOKENS = flags.DEFINE_integer("hf_num_assistant_tokens", None,
                                  "HF assisted generation draft length (default: HF's).")
_HF_THRESHOLD = flags.DEFINE_float("hf_assistant_confidence_threshold", None,
                                   "HF assisted generation early-stop threshold (default: HF's).")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 1, "torch intra-op threads; 0 leaves torch's default. One is torch's best "
    "case for these tiny models on a shared CPU: with more, every op waits at an OpenMP barrier "
    "for threads the OS has not scheduled (see docs/notes/peers.md).")
_OUT_JSON = flags.DEFINE_string("out_json", None, "Also write all results here.")
_PLOT = flags.DEFINE_string("plot", None, "Write a bar chart of tokens/s (PNG) here.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from specedge_jax.bench import peers as peer_bench
  from specedge_jax.engine import TreeParams

  peer_bench.run(
      _TARGET.value, _DRAFT.value, _PROMPTS.value, num_prompts=_NUM_PROMPTS.value,
      max_new_tokens=_MAX_NEW.value,
      tree=TreeParams(_N_BEAMS.value, _BEAM_LEN.value, _BRANCH.value, _BUDGET.value),
      eos_token_ids=None if _EOS.value is None else [int(t) for t in _EOS.value],
      repeats=_REPEATS.value, methods=_METHODS.value,
      hf_num_assistant_tokens=_HF_TOKENS.value,
      hf_assistant_confidence_threshold=_HF_THRESHOLD.value,
      torch_threads=_TORCH_THREADS.value or None, out_json=_OUT_JSON.value, plot=_PLOT.value)


if __name__ == "__main__":
  app.run(main)
