"""bf16 greedy agreement (`bench/bf16_agreement.py`, `launch/bench_bf16.py`): the comparison
arithmetic by hand, the fp32 exactness check on both sides, and the whole run on the embedded
pair (2 prompts x 16 tokens), whose JSON must hold consistent fields and an exact fp32 path. No
bf16 agreement value is asserted: it depends on the machine's rounding."""

import io
import json

import pytest
from rich.console import Console

from specedge_jax.bench import bf16_agreement as agreement_lib
from specedge_jax.data import assets


def test_first_divergence_and_prompt_agreement():
  assert agreement_lib.first_divergence([1, 2, 3], [1, 2, 3]) is None
  assert agreement_lib.first_divergence([1, 2, 3], [1, 5, 3]) == 1
  assert agreement_lib.first_divergence([1, 2], [1, 2, 3]) == 2  # one stopped at EOS earlier
  same = agreement_lib.compare_prompt(0, [4, 5], [4, 5])
  assert same.exact and same.rate == 1.0 and same.agreed == same.length == 2
  parted = agreement_lib.compare_prompt(3, [4, 5, 6, 7], [4, 9, 6, 7])
  assert not parted.exact and parted.agreed == 1 and parted.rate == 0.25
  assert parted.divergence == agreement_lib.Divergence(3, 1, 5, 9)
  shorter = agreement_lib.compare_prompt(1, [4, 5], [4, 5, 6])
  assert shorter.divergence == agreement_lib.Divergence(1, 2, None, 6)
  assert shorter.length == 3 and shorter.agreed == 2


def test_agreement_rates_first_divergence_and_json():
  outputs = {"a": [[1, 2, 3, 4], [5, 6], [7, 8, 9, 9]], "b": [[1, 2, 3, 4], [5, 0], [7, 1, 9, 9]]}
  agreement = agreement_lib.compare_runs(outputs, "a", "b")
  assert agreement.name == "a vs b"
  assert agreement.token_agreement_rate == pytest.approx((4 + 1 + 1) / 10)
  assert agreement.exact_match_rate == pytest.approx(1 / 3)
  # Both diverge at index 1: the lower prompt wins.
  assert agreement.first_divergence == agreement_lib.Divergence(1, 1, 6, 0)
  data = agreement.to_json()
  assert data["num_diverged"] == 2 and data["num_prompts"] == 3
  assert data["first_divergence"]["prompt"] == 1 and data["prompts"][0]["divergence"] is None
  assert data["prompts"][2]["divergence"]["token_b"] == 1
  with pytest.raises(ValueError, match="sequences"):
    agreement_lib.compare_runs({"a": [[1]], "b": []}, "a", "b")


def test_fp32_exactness_check_fails_a_lossy_run():
  agreement_lib.check_fp32_exact({"spec_fp32": [[1, 2]], "target_fp32": [[1, 2]]})
  with pytest.raises(agreement_lib.ExactnessError, match="prompt 0, position 1: 3 vs 2"):
    agreement_lib.check_fp32_exact({"spec_fp32": [[1, 3]], "target_fp32": [[1, 2]]})


def _check_consistent(comparison: dict, max_new_tokens: int):
  assert 0.0 <= comparison["token_agreement_rate"] <= 1.0
  assert 0.0 <= comparison["exact_match_rate"] <= 1.0
  diverged = [p for p in comparison["prompts"] if not p["exact"]]
  assert comparison["num_diverged"] == len(diverged)
  assert comparison["exact_match_rate"] == pytest.approx(
      1 - len(diverged) / comparison["num_prompts"])
  for p in comparison["prompts"]:
    assert 1 <= p["length"] <= max_new_tokens and 0.0 <= p["agreement_rate"] <= 1.0
    if p["exact"]:
      assert p["divergence"] is None and p["agreed"] == p["length"]
    else:
      d = p["divergence"]
      assert d["index"] == p["agreed"] < p["length"] and d["prompt"] == p["prompt"]
      assert d["token_a"] != d["token_b"]
      assert d["margin_bf16"] >= 0 and d["margin_fp32"] >= 0
  if diverged:
    first = comparison["first_divergence"]
    assert first["index"] == min(p["divergence"]["index"] for p in diverged)
  else:
    assert comparison["first_divergence"] is None and comparison["token_agreement_rate"] == 1.0


# The run end to end (both dtypes on the embedded pair) is tested once, as the bf16 section of
# `launch.bench_gpu --profile=tiny` (tests/bench/test_bench_gpu.py): the same call, 2 x 16.