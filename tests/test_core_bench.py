"""The in-process core benchmark (`launch/bench_core.py`) on a tiny pair: the verify curve covers
every (B, T) asked for, and the generation comparison times only warm code (no compiles), checks
every pass against target-only greedy, and reports what the speculative run accepted."""

import pytest

from specedge_jax import engine as E
from specedge_jax.bench import core as core_bench

import spec_models

VOCAB = 64


@pytest.fixture(scope="module")
def pair():
  return spec_models.make_pair(VOCAB, noise=0.005)


@pytest.mark.slow
def test_verify_curve_covers_the_grid_relative_to_one_token(pair):
  target, _ = pair
  points = core_bench.verify_curve(target, [1, 2], [1, 4], prefix_len=8, repeats=2)
  assert [(p.batch_size, p.tree_tokens) for p in points] == [(1, 1), (1, 4), (2, 1), (2, 4)]
  for p in points:
    assert p.median_ms > 0
    if p.tree_tokens == 1:
      assert p.ratio_to_t1 == pytest.approx(1.0)


@pytest.mark.slow
def test_generation_comparison_is_exact_warm_and_best_of_its_passes(pair):
  target, draft = pair
  prompts = spec_models.prompts(3, VOCAB, seed=5, max_len=12)
  comparison = core_bench.compare_generation(
      target, draft, prompts, batch_size=1, tree=E.TreeParams(2, 3, 2, 6),
      proactive=E.ProactiveParams(mode="disabled"), max_new_tokens=8, repeats=2)
  assert comparison.identical_outputs
  assert comparison.compiles_in_timed_runs == 0
  assert comparison.ar_tokens == comparison.spec_tokens == 3 * 8
  assert comparison.mean_accepted > 0 and comparison.proactive_hit_rate is None
  assert 0.0 <= comparison.host_overhead < 1.0
  steps, size, tokens = comparison.fresh
  assert comparison.after_hit[0] == 0 and steps > 0  # no proactive drafting: every tree fresh
  assert 1 <= size <= 7 and tokens >= 1
  assert comparison.speedup == pytest.approx(
      comparison.spec_tokens_per_s / comparison.ar_tokens_per_s)
  with pytest.raises(ValueError, match="repeats"):
    core_bench.compare_generation(target, draft, prompts, batch_size=1,
                                  tree=E.TreeParams(2, 3, 2, 6),
                                  proactive=E.ProactiveParams(mode="disabled"),
                                  max_new_tokens=8, repeats=0)


def test_split_by_proactive_hit_follows_each_request():
  """Request 0 hits in step 1, so its step 2 follows a hit; request 1 hits in step 2 and ends;
  request 0's hit in step 2 makes its step 3 follow a hit too."""
  step = lambda requests, sizes, emitted, hits: E.StepStats(
      active=len(requests), requests=requests, emitted=emitted, tree_sizes=sizes, draft_s=0.0,
      verify_s=0.0, proactive_hits=hits)
  output = E.GenerationOutput(tokens=[], wall_s=1.0, steps=[
      step([0, 1], [9, 9], [3, 2], [True, False]),
      step([0, 1], [5, 9], [1, 4], [True, True]),
      step([0], [7], [2], [False]),
  ])
  split = output.split_by_proactive_hit()
  assert split["after_hit"] == (2, 6.0, 1.5)  # request 0, steps 2 and 3
  assert split["fresh"] == (3, 9.0, 3.0)  # step 1 (both) and request 1's step 2
  empty = E.GenerationOutput(tokens=[], wall_s=1.0, steps=[]).split_by_proactive_hit()
  assert empty["after_hit"] == (0, None, None) and empty["fresh"] == (0, None, None)
