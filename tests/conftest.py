"""Shared fixtures: tiny random HF checkpoints built locally (no hub), and absl flag pre-parsing."""

import os

# Keep JAX on CPU with deterministic float32 matmuls, and let XLA use both cores.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Four host devices, so the sharded verifier's tests have a mesh to shard over (unsharded code
# still runs on device 0). Must be set before JAX initializes its backend.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()

import pytest
from absl import flags

# Launchers define absl flags at import. Mark them parsed so tests can import launchers and read
# defaults without absl trying to parse pytest's own argv.
flags.FLAGS.mark_as_parsed()

# The random HF checkpoints are the library's test doubles; some tests import these names from here.
from specedge_jax.testing.checkpoints import HF_FAMILIES, make_hf_model, save_hf_model  # noqa: E402,F401


@pytest.fixture(scope="session")
def hf_checkpoint_dir(tmp_path_factory):
  """Returns a function family -> (folder, torch model) that caches saved tiny checkpoints."""
  cache = {}

  def get(family: str, tie: bool = False):
    key = (family, tie)
    if key not in cache:
      folder = tmp_path_factory.mktemp(f"hf_{family}_{'tied' if tie else 'untied'}")
      cache[key] = (str(folder), save_hf_model(folder, family, tie=tie))
    return cache[key]

  return get


@pytest.fixture(scope="session")
def served_pair_dirs(tmp_path_factory):
  """HF folders {'target', 'draft'} of a tiny Qwen3 target and a close draft, with a byte-level
  BPE tokenizer trained on the embedded prompts (so the embedded prompt set and its chat template
  work): the pair that the process-level tests (local cluster, sweep) serve."""
  from specedge_jax.checkpoints import hf
  from specedge_jax.data import prompts
  from specedge_jax.testing import tiny_models
  from specedge_jax.training import bpe_tokenizer

  records = prompts.load_records()
  texts = [r["text"] if "text" in r else " ".join(m["content"] for m in r["messages"])
           for r in records]
  tokenizer = bpe_tokenizer.train_tokenizer(texts * 4, vocab_size=len(bpe_tokenizer.SPECIAL_TOKENS) + 320)
  target, draft = tiny_models.make_pair(len(tokenizer), noise=0.005)
  root = tmp_path_factory.mktemp("served_pair")
  dirs = {}
  for name, model in (("target", target), ("draft", draft)):
    folder = str(root / name)
    hf.save_hf(folder, model.config, hf.params_of(model))
    bpe_tokenizer.save_tokenizer(tokenizer, folder)
    dirs[name] = folder
  return dirs


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
  """One persistent XLA compilation cache for the whole session's launcher subprocesses (the
  main job, its netns variant, the sweep): they compile the same verifier and drafter programs
  for the same tiny pair, and a fresh CI machine would otherwise compile them once per test."""
  return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs after each test module. The whole suite compiles thousands of
  programs (sharded, per-layer, per bucket); kept all at once, a late eager compile crashed
  XLA:CPU's compiler with a segmentation fault, in the same test on two full runs (session 18,
  WORKSPACE_NOTES.md). Modules share few programs, so recompiling costs little."""
  yield
  import gc

  import jax

  jax.clear_caches()
  gc.collect()
