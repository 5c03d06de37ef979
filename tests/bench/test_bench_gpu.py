"""The GPU benchmark (`bench/gpu.py`, `launch/bench_gpu.py`): its arithmetic by hand (bytes a
step reads, MBU, the replayed SpecEdge vs server-only ratio, the peak-bandwidth table, the
profiles), an out-of-memory point recorded instead of raised, and the tiny profile end to end on
CPU in a subprocess, whose JSON must hold every section."""

import json
import os
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from specedge_jax.bench import gpu
from specedge_jax.models import model_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("kind, expected", [
    ("NVIDIA H200", 4.8e12), ("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H100 PCIe", 2.0e12),
    ("NVIDIA GH200 480GB", 4.0e12), ("NVIDIA A100-SXM4-80GB", 2.039e12),
    ("NVIDIA A100 80GB PCIe", 1.935e12), ("NVIDIA A100-SXM4-40GB", 1.555e12),
    ("NVIDIA L4", 3.0e11), ("NVIDIA L40S", 8.64e11), ("NVIDIA GeForce RTX 4090", 1.008e12),
    ("cpu", None), ("TPU v5 lite", None)])
def test_peak_bandwidth_by_device_kind(kind, expected):
  assert gpu.peak_bandwidth(kind) == expected


def test_bytes_read_by_hand_for_the_paper_pair():
  profile = gpu.make_profile("quick")
  target, draft = profile.target, profile.draft
  # Parameter counts checked against transformers in tests/models/test_configs.py.
  assert gpu.parameter_count(target) == 14_768_307_200
  assert gpu.parameter_count(draft) == 1_720_574_976
  embedding = 151_936 * 5_120 * 2
  assert gpu.weight_bytes(target) == 2 * 14_768_307_200
  assert gpu.weight_bytes_read(target) == 2 * 14_768_307_200 - embedding  # untied: rows only
  assert draft.tie_word_embeddings and gpu.weight_bytes_read(draft) == gpu.weight_bytes(draft)
  assert gpu.kv_row_bytes(target) == 2 * 40 * 8 * 128 * 2  # k and v, every layer, bf16
  assert gpu.kv_bytes_read(target, 8, 1024) == 8 * 1024 * 163_840
  need = gpu.memory_need(profile)
  assert need["cache"] == 8 * 2048 * 163_840
  assert need["steady"] == need["weights"] + need["cache"]
  assert need["peak"] == 2 * need["weights"] + need["cache"]


def test_mbu_and_replay_arithmetic():
  assert gpu.mbu(4_800_000_000, 1e-3, 4.8e12) == pytest.approx(1.0)
  assert gpu.mbu(10, 1.0, None) is None
  points = [{"batch_size": 4, "tree_tokens": 1, "median_ms": 10.0},
            {"batch_size": 4, "tree_tokens": 8, "median_ms": 12.0},
            {"batch_size": 4, "tree_tokens": 32, "median_ms": 20.0},
            {"batch_size": 4, "tree_tokens": 64, "median_ms": None},  # out of memory
            {"batch_size": 8, "tree_tokens": 8, "median_ms": 15.0}]  # no decode step at B=8
  rows = gpu.replay(points, {8: 3.0, 32: 4.5, 64: 5.0})
  assert [(r["batch_size"], r["tree_tokens"]) for r in rows] == [(4, 8), (4, 32)]
  first = rows[0]
  assert first["specedge_tokens_per_compute_s"] == pytest.approx(4 * 3.0 / 0.012)
  assert first["server_only_tokens_per_compute_s"] == pytest.approx(4 / 0.010)
  assert first["ratio"] == pytest.approx(3.0 * 10.0 / 12.0)
  assert first["ratio_vs_paper"] == pytest.approx(2.5 / gpu.PAPER_RATIO)
  assert rows[1]["ratio"] == pytest.approx(4.5 * 10.0 / 20.0)
  assert gpu.best_ratio_per_batch(rows)[4]["tree_tokens"] == 8
  assert "REPLAY" in gpu.REPLAY_DEFINITION and "2.22" in gpu.REPLAY_DEFINITION


def test_tree_per_size_is_the_reference_shape_capped_by_the_budget():
  assert gpu.tree_spec_for(33) == "32:4:16:32"  # the reference's tree
  assert gpu.tree_spec_for(8) == "7:4:7:7"
  assert gpu.tree_spec_for(64) == "32:4:16:63"
  with pytest.raises(ValueError, match="decoding"):
    gpu.tree_spec_for(1)


def test_acceptance_json_formats(tmp_path):
  ours = tmp_path / "ours.json"
  ours.write_text(json.dumps({"acceptance": {"per_tree": [
      {"tree_tokens": 8, "tokens_per_verify": 2.5},
      {"tree_tokens": 32, "tokens_per_verify": 3.2}]}}))
  assert gpu.load_acceptance_json(str(ours)) == {8: 2.5, 32: 3.2}
  plain = tmp_path / "plain.json"
  plain.write_text(json.dumps({"8": 2.0, "16": 2.75}))
  assert gpu.load_acceptance_json(str(plain)) == {8: 2.0, 16: 2.75}


def test_profiles_and_overrides():
  full, quick, tiny = (gpu.make_profile(name) for name in gpu.PROFILES)
  assert full.tree_sizes == (1, 8, 16, 32, 64) and full.batch_sizes == (1, 4, 8, 16)
  assert quick.tree_sizes == (1, 8, 32) and quick.batch_sizes == (1, 8)
  assert quick.target.num_layers == 40 and quick.draft.num_layers == 28
  assert quick.prefix_len == 512 and tiny.target.num_layers == 4
  custom = gpu.make_profile("quick", tree_sizes=(1, 16), repeats=3, batch_sizes=None)
  assert custom.tree_sizes == (1, 16) and custom.repeats == 3 and custom.batch_sizes == (1, 8)
  with pytest.raises(ValueError, match="T = 1"):
    gpu.make_profile("tiny", tree_sizes=(8,))
  with pytest.raises(ValueError, match="unknown profile"):
    gpu.make_profile("huge")
  assert gpu.default_out_dir("NVIDIA H200", "quick") == os.path.join("results", "gpu",
                                                                      "NVIDIA-H200-quick")


def test_random_model_is_drawn_in_bf16_with_unit_norms():
  config = model_config.tiny_config("qwen3", vocab_size=64)
  model = gpu.random_model(config)
  assert model.dtype == jnp.bfloat16
  kernel = np.asarray(model.lm_head.kernel[...], np.float32)
  assert model.lm_head.kernel[...].dtype == jnp.bfloat16
  assert 0.01 < kernel.std() < 0.03
  assert np.all(np.asarray(model.final_norm.scale[...], np.float32) == 1.0)


class _FakeCache:
  class _Array:
    dtype = jnp.bfloat16

    def is_deleted(self):
      return False

  k = _Array()


class _FakeEngine:
  config = model_config.tiny_config("qwen3", vocab_size=64)
  attend_buckets = (64, 128)
  graphdef = state = None
  cache = _FakeCache()
  num_slots, max_len = 2, 128


def test_an_out_of_memory_point_is_recorded_and_other_errors_raise(monkeypatch):
  from specedge_jax.spec import verify as verify_lib

  class _Failing:
    def __init__(self, message):
      self.message = message

    def lower(self, *args, **kwargs):
      raise RuntimeError(self.message)

  profile = gpu.make_profile("tiny")
  timer = gpu.StepTimer(_FakeEngine(), profile, 1e12)
  monkeypatch.setattr(verify_lib, "verify", _Failing("RESOURCE_EXHAUSTED: Out of memory while "
                                                     "trying to allocate 9 GiB"))
  row = timer.point(2, 8)
  assert row["error"].startswith("out of memory") and row["median_ms"] is None
  assert row["attend_len"] == 128 and row["mbu"] is None
  assert row["bytes_read"] == row["weight_bytes_read"] + row["kv_bytes_read"]
  monkeypatch.setattr(verify_lib, "verify", _Failing("INVALID_ARGUMENT: a real bug"))
  with pytest.raises(RuntimeError, match="a real bug"):
    timer.point(1, 1)


@pytest.mark.slow
@pytest.mark.heavy  # ~75 s: the GPU script end to end on CPU
def test_tiny_profile_end_to_end_on_cpu(tmp_path):
  out_dir = tmp_path / "bgpu"
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "launch.bench_gpu", "--profile=tiny",
                         f"--out_dir={out_dir}"], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
  elapsed = time.perf_counter() - start
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  data = json.loads((out_dir / "bench_gpu.json").read_text())
  assert set(gpu.SECTIONS) <= set(data) and data["errors"] == {}
  assert data["sections_done"] == list(gpu.SECTIONS)
  assert data["device"]["backend"] == "cpu" and data["device"]["jax_version"]
  assert data["device"]["peak_bandwidth_bytes_per_s"] is None  # MBU n/a on CPU
  grid = data["verify_grid"]["points"]
  assert [(p["batch_size"], p["tree_tokens"]) for p in grid] == [(1, 1), (1, 8), (2, 1), (2, 8)]
  for p in grid + data["draft_decode"]["points"]:
    assert p["error"] is None and p["median_ms"] > 0 and p["mbu"] is None
    assert p["attend_len"] >= p["prefix_len"] + p["tree_tokens"]
  assert [p["tree_tokens"] for p in data["draft_decode"]["points"]] == [1, 1]
  # XLA:CPU copies each layer's weights in the scan; the engine's layerwise state copies none.
  assert data["hlo"]["stacked_scan"]["count"] > 0 and data["hlo"]["layerwise"]["count"] == 0
  timed = data["hlo"]["timed"]
  assert [(t["batch_size"], t["tree_tokens"]) for t in timed] == [(1, 1), (1, 8)]
  assert all(t["stacked_scan_ms"] > 0 and t["layerwise_ms"] > 0 for t in timed)
  (tree,) = data["acceptance"]["per_tree"]
  assert tree["tree_tokens"] == 8 and tree["identical_to_target_only"]
  assert tree["tokens_per_verify"] == pytest.approx(sum(tree["by_depth"]))
  assert {(r["batch_size"], r["tree_tokens"]) for r in data["replay"]["rows"]} == {(1, 8), (2, 8)}
  assert "REPLAY" in data["replay"]["definition"]
  agreement = data["bf16_agreement"]
  assert agreement["fp32_exact"] is True
  assert agreement["outputs"]["spec_fp32"] == agreement["outputs"]["target_fp32"]
  assert set(agreement["comparisons"]) == {"spec_bf16_vs_target_bf16",
                                           "target_bf16_vs_target_fp32",
                                           "spec_bf16_vs_target_fp32"}
  for comparison in agreement["comparisons"].values():
    assert 0.0 <= comparison["token_agreement_rate"] <= 1.0 and comparison["num_prompts"] == 2
  assert os.path.getsize(out_dir / "bench_gpu.png") > 10_000
  print(f"tiny profile end to end: {elapsed:.1f} s")


def test_acceptance_by_depth_sums_to_the_mean():
  from specedge_jax.bench import core as core_bench

  # 1 verification emitted 1 token, 2 emitted 2, 1 emitted 3: mean (1 + 4 + 3) / 4 = 2.
  acceptance = core_bench.Acceptance("4:4:2:8", 2.0, 3, True, emitted_counts=(1, 2, 1))
  assert acceptance.by_depth == (1.0, 0.75, 0.25)
  assert sum(acceptance.by_depth) == pytest.approx(acceptance.mean_accepted)
  assert core_bench.Acceptance("4:4:2:8", 0.0, 0, True).by_depth == ()
