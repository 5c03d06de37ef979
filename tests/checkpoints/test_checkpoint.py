"""Invariant 4: HF -> orbax -> restore is bit-identical, and bad checkpoints fail loudly.

Every expected value is taken from the torch model's own state dict, not from our loader, so a
wrong name map, transpose or cast shows up here.
"""

import json
import os
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from absl.testing import flagsaver
from safetensors.numpy import save_file

from launch import convert
from specedge_jax.checkpoints import hf, orbax_io
from specedge_jax.checkpoints.hf import CheckpointError
from specedge_jax.models.model_config import tiny_config
from specedge_jax.models.transformer import causal_mask
from specedge_jax.testing.checkpoints import make_hf_model


def hf_state(model, dtype=torch.float32) -> dict[str, np.ndarray]:
  """The HF tensors as numpy, in HF layout (bf16 via ml_dtypes)."""
  out = {}
  for name, tensor in model.state_dict().items():
    tensor = tensor.detach().to(dtype)
    if dtype == torch.bfloat16:
      out[name] = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      out[name] = tensor.numpy().copy()
  return out


def expected_params(config, state: dict[str, np.ndarray]) -> dict:
  """Our tree, built independently of `load_hf_params`: per-tensor rule lookup and np.stack."""
  rules = hf.active_rules(config)
  tree = {}
  for rule in rules:
    if rule.per_layer:
      value = np.stack([state[rule.hf.format(layer=i)] for i in range(config.num_layers)])
      value = np.swapaxes(value, 1, 2) if rule.to_ours else value
    else:
      value = state[rule.hf].T if rule.to_ours else state[rule.hf]
    hf._set(tree, rule.ours, value)
  return tree


def assert_bit_identical(actual: dict, expected: dict) -> None:
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    a = np.asarray(a)
    assert a.dtype == e.dtype, jax.tree_util.keystr(path)
    assert a.shape == e.shape, jax.tree_util.keystr(path)
    # Compare raw bits: NaN-safe and exact.
    assert np.array_equal(a.view(np.uint8), np.ascontiguousarray(e).view(np.uint8)), \
        jax.tree_util.keystr(path)


def write_hf(folder, config_json: dict, tensors: dict[str, np.ndarray], shards: int = 1) -> str:
  """An HF folder from raw tensors: one file, or `shards` files plus an index."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config_json, f)
  if shards == 1:
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return str(folder)
  names = list(tensors)
  weight_map = {}
  for s in range(shards):
    file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {n: tensors[n] for n in names[s::shards]}  # interleaved: layers span shards
    save_file(part, os.path.join(folder, file), metadata={"format": "pt"})
    weight_map.update({n: file for n in part})
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
  return str(folder)


@pytest.fixture(scope="module")
def tiny_hf(hf_checkpoint_dir):
  """(folder, torch model, config.json dict, HF tensors) of a tiny untied Qwen3."""
  folder, model = hf_checkpoint_dir("qwen3")
  with open(os.path.join(folder, "config.json")) as f:
    config_json = json.load(f)
  return folder, model, config_json, hf_state(model)


def logits_of(model):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (1, 9)), jnp.int32)
  logits, _ = model(tokens, jnp.arange(9)[None], causal_mask(jnp.array([9]), 9))
  return np.asarray(logits)


# ------------------------------------------------------------------------------------------------
# Round trips.


def test_hf_to_orbax_round_trip_is_bit_identical(tiny_hf, tmp_path):
  folder, _, _, state = tiny_hf
  config = orbax_io.convert_hf(folder, tmp_path / "ckpt", "fp32")
  restored_config, restored = orbax_io.restore_params(tmp_path / "ckpt")
  assert restored_config == config == hf.hf_config(folder)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
  assert_bit_identical(restored, expected_params(config, state))
  # The live models built from either source compute exactly the same logits.
  np.testing.assert_array_equal(logits_of(orbax_io.load_model(tmp_path / "ckpt")),
                                logits_of(orbax_io.load_model(folder)))


def test_bf16_conversion_rounds_each_value_once(tiny_hf, tmp_path):
  folder, _, _, state = tiny_hf
  config = orbax_io.convert_hf(folder, tmp_path / "ckpt", "bf16")
  _, restored = orbax_io.restore_params(tmp_path / "ckpt")
  expected = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), expected_params(config, state))
  assert_bit_identical(restored, expected)
  with open(tmp_path / "ckpt" / orbax_io.METADATA_FILE) as f:
    assert json.load(f)["param_dtype"] == "bfloat16"
  # Restoring with a dtype override casts while reading.
  _, widened = orbax_io.restore_params(tmp_path / "ckpt", dtype="fp32")
  assert_bit_identical(widened, jax.tree.map(lambda x: x.astype(np.float32), expected))


def test_bf16_hf_checkpoint_reads_bit_exact(tiny_hf, tmp_path):
  """A bf16 HF file goes straight into bf16 buffers (the no-cast read path), transposes too."""
  _, model, config_json, _ = tiny_hf
  state = hf_state(model, torch.bfloat16)
  folder = write_hf(tmp_path / "hf", config_json, state)
  config, params = hf.load_hf_params(folder, dtype="bf16")
  assert_bit_identical(params, expected_params(config, state))


def test_tied_checkpoint_with_stored_head_copy(tmp_path):
  """Qwen3-1.7B ships `lm_head.weight` although embeddings are tied: it is skipped, not an error."""
  model = make_hf_model("qwen3", tie=True)
  model.save_pretrained(tmp_path / "hf")
  with open(tmp_path / "hf" / "config.json") as f:
    config_json = json.load(f)
  state = hf_state(model)
  state["lm_head.weight"] = state["model.embed_tokens.weight"].copy()
  folder = write_hf(tmp_path / "hf_with_head", config_json, state)
  config, params = hf.load_hf_params(folder)
  assert config.tie_word_embeddings and "lm_head" not in params
  del state["lm_head.weight"]
  assert_bit_identical(params, expected_params(config, state))


def test_sharded_folder_matches_single_file(tiny_hf, tmp_path):
  folder, _, config_json, state = tiny_hf
  sharded = write_hf(tmp_path / "sharded", config_json, state, shards=3)
  assert len(hf.hf_weight_files(sharded)) == 3
  config, params = hf.load_hf_params(sharded)
  assert_bit_identical(params, expected_params(config, state))
  np.testing.assert_array_equal(logits_of(orbax_io.load_model(sharded)),
                                logits_of(orbax_io.load_model(folder)))


def test_shards_that_disagree_with_their_index_name_the_tensor(tiny_hf, tmp_path):
  _, _, config_json, state = tiny_hf
  sharded = write_hf(tmp_path / "sharded", config_json, state, shards=2)
  index_path = os.path.join(sharded, "model.safetensors.index.json")
  with open(index_path) as f:
    index = json.load(f)
  name = "model.layers.1.mlp.up_proj.weight"
  actual = index["weight_map"][name]
  index["weight_map"][name] = next(v for v in index["weight_map"].values() if v != actual)
  with open(index_path, "w") as f:
    json.dump(index, f)
  with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
    hf.load_hf_params(sharded)
  index["weight_map"][name] = "model-00009-of-00009.safetensors"
  with open(index_path, "w") as f:
    json.dump(index, f)
  with pytest.raises(CheckpointError, match="00009.*does not exist"):
    hf.load_hf_params(sharded)


def test_save_hf_round_trips_through_transformers(tiny_hf, tmp_path):
  """Export streams its own safetensors writer: safetensors, transformers and we must read it."""
  folder, model, _, state = tiny_hf
  config, params = hf.load_hf_params(folder)
  hf.save_hf(str(tmp_path / "export"), config, params)
  import safetensors.numpy
  reread = safetensors.numpy.load_file(str(tmp_path / "export" / "model.safetensors"))
  assert set(reread) == set(state)
  for name, value in state.items():
    np.testing.assert_array_equal(reread[name], value, err_msg=name)
  import transformers
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
  tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
  with torch.no_grad():
    np.testing.assert_array_equal(exported(tokens).logits.numpy(), model(tokens).logits.numpy())
  hf.save_hf(str(tmp_path / "export_bf16"), config, params, dtype="bf16")
  _, bf16 = hf.load_hf_params(str(tmp_path / "export_bf16"), dtype="bf16")
  assert_bit_identical(bf16, jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), params))


def test_orbax_save_does_not_copy_host_arrays(tmp_path):
  """Orbax's default numpy handler deep-copies every array before writing; ours must not.

  numpy reports its allocations to tracemalloc, so a copy of the tree shows up in the peak.
  """
  config = tiny_config("qwen3", vocab_size=512, hidden_size=256, intermediate_size=512,
                       num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64)
  params = jax.tree.map(lambda a: np.ones(a.shape, np.float32),
                        hf.abstract_params(config))
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  tracemalloc.start()
  try:
    orbax_io.save(tmp_path / "ckpt", config, params)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert total > 8e6
  assert peak < 0.25 * total, f"orbax save allocated {peak} bytes for a {total}-byte tree"


# ------------------------------------------------------------------------------------------------
# Bad checkpoints name what is wrong.


def _broken(tmp_path, tiny_hf, edit) -> str:
  _, _, config_json, state = tiny_hf
  state = dict(state)
  edit(state)
  return write_hf(tmp_path / "broken", config_json, state)


def test_unknown_tensor_is_named(tiny_hf, tmp_path):
  def edit(state):
    state["model.layers.0.mlp.extra_proj.weight"] = np.zeros((4, 4), np.float32)
  with pytest.raises(CheckpointError, match=r"unknown tensor 'model\.layers\.0\.mlp\.extra_proj"):
    hf.load_hf_params(_broken(tmp_path, tiny_hf, edit))


def test_missing_tensor_is_named(tiny_hf, tmp_path):
  def edit(state):
    del state["model.layers.1.self_attn.k_norm.weight"]
  with pytest.raises(CheckpointError,
                     match=r"1 tensor\(s\) missing.*'model\.layers\.1\.self_attn\.k_norm\.weight'"):
    hf.load_hf_params(_broken(tmp_path, tiny_hf, edit))


def test_wrong_shape_is_named(tiny_hf, tmp_path):
  def edit(state):
    state["model.layers.1.self_attn.q_proj.weight"] = np.zeros((64, 31), np.float32)
  with pytest.raises(CheckpointError,
                     match=r"'model\.layers\.1\.self_attn\.q_proj\.weight' has shape \(64, 31\)"):
    hf.load_hf_params(_broken(tmp_path, tiny_hf, edit))


def test_layer_out_of_range_is_named(tiny_hf, tmp_path):
  def edit(state):
    state["model.layers.7.input_layernorm.weight"] = np.ones(32, np.float32)
  with pytest.raises(CheckpointError, match=r"'model\.layers\.7\.input_layernorm\.weight'.*range"):
    hf.load_hf_params(_broken(tmp_path, tiny_hf, edit))


def test_truncated_safetensors_file_is_reported(tiny_hf, tmp_path):
  folder = _broken(tmp_path, tiny_hf, lambda state: None)
  path = os.path.join(folder, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  with pytest.raises(CheckpointError, match=r"tensor '.*' in .*model\.safetensors: data_offsets"):
    hf.load_hf_params(folder)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('["a", "list"]', "config.json"),
    ('{"model_type": "qwen3", "vocab_size": 97}', "missing required field 'hidden_size'"),
    ('{"model_type": "gpt2"}', "model_type 'gpt2'"),
])
def test_malformed_config_json(tiny_hf, tmp_path, content, message):
  folder = _broken(tmp_path, tiny_hf, lambda state: None)
  with open(os.path.join(folder, "config.json"), "w") as f:
    f.write(content)
  with pytest.raises(CheckpointError, match=message):
    hf.load_hf_params(folder)


@pytest.mark.parametrize("field, value, message", [
    ("intermediate_size", 48, r"\['down_proj'\]\['kernel'\] has shape \(2, 64, 32\); the "
                              r"config's model expects \(2, 48, 32\)"),
    ("num_layers", 3, r"\['k_norm'\]\['scale'\] has shape \(2, 16\).*expects \(3, 16\)"),
    ("bogus_field", 1, "unknown field"),
])
def test_orbax_metadata_that_disagrees_with_the_arrays(tiny_hf, tmp_path, field, value, message):
  orbax_io.convert_hf(tiny_hf[0], tmp_path / "ckpt", "fp32")
  meta_path = tmp_path / "ckpt" / orbax_io.METADATA_FILE
  meta = json.loads(meta_path.read_text())
  meta["model_config"][field] = value
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match=message):
    orbax_io.restore_params(tmp_path / "ckpt")


def test_load_model_rejects_a_folder_that_is_neither(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="neither"):
    orbax_io.load_model(tmp_path / "empty")


def test_save_refuses_to_clobber(tiny_hf, tmp_path):
  folder = tiny_hf[0]
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("precious")
  with pytest.raises(CheckpointError, match="not empty"):
    orbax_io.convert_hf(folder, tmp_path / "other", "fp32")
  with pytest.raises(CheckpointError, match="not a specedge orbax checkpoint"):
    orbax_io.convert_hf(folder, tmp_path / "other", "fp32", overwrite=True)
  assert (tmp_path / "other" / "notes.txt").read_text() == "precious"
  orbax_io.convert_hf(folder, tmp_path / "ckpt", "fp32")
  orbax_io.convert_hf(folder, tmp_path / "ckpt", "bf16", overwrite=True)
  assert orbax_io.read_metadata(tmp_path / "ckpt")[1] == "bfloat16"


# ------------------------------------------------------------------------------------------------
# The launcher.


def test_convert_launcher_end_to_end(tiny_hf, tmp_path):
  folder, _, _, state = tiny_hf
  out = str(tmp_path / "converted")
  with flagsaver.flagsaver(hf_dir=folder, out_dir=out, dtype="fp16"):
    convert.main(["convert"])
  config, params = orbax_io.restore_params(out)
  assert_bit_identical(params, jax.tree.map(lambda x: x.astype(np.float16),
                                            expected_params(config, state)))
  # A second run without --overwrite fails cleanly, naming the directory.
  with flagsaver.flagsaver(hf_dir=folder, out_dir=out, dtype="fp16"):
    with pytest.raises(SystemExit) as exit_info:
      convert.main(["convert"])
  assert exit_info.value.code == 1
