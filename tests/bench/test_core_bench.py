"""The in-process core benchmark (`launch/bench_core.py`) on a tiny pair: the verify curve covers
every (B, T) asked for, and the generation comparison times only warm code (no compiles), checks
every pass against target-only greedy, and reports what the speculative run accepted."""

import io
import json

import pytest
from rich.console import Console

from specedge_jax import engine as E
from specedge_jax.bench import core as core_bench
from specedge_jax.testing import tiny_models

VOCAB = 64


@pytest.fixture(scope="module")
def pair():
  return tiny_models.make_pair(VOCAB, noise=0.005)


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
  prompts = tiny_models.prompts(3, VOCAB, seed=5, max_len=12)
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


def _text(renderable) -> str:
  console = Console(file=io.StringIO(), width=400)
  console.print(renderable)
  return console.file.getvalue()


POINTS = [core_bench.VerifyPoint(1, 1, 2.0, 1.0), core_bench.VerifyPoint(1, 8, 4.0, 2.0),
          core_bench.VerifyPoint(4, 1, 3.0, 1.0)]


def _comparison(**changes):
  fields = {"batch_size": 2, "tree": E.TreeParams(2, 3, 2, 6), "proactive_mode": "excluded",
            "num_prompts": 3, "ar_tokens": 24, "ar_wall_s": 2.0, "spec_tokens": 24,
            "spec_wall_s": 1.0, "mean_accepted": 2.5, "proactive_hit_rate": 0.5,
            "host_overhead": 0.125, "after_hit": (2, 6.0, 1.5), "fresh": (3, 9.0, 3.0),
            "identical_outputs": False, "compiles_in_timed_runs": 1}
  return core_bench.GenerationComparison(**{**fields, **changes})


def test_verify_curve_table_and_plot(tmp_path):
  assert core_bench.verify_curve_row(POINTS[1]) == ["1", "8", "4.00", "2.00", "0.500"]
  assert core_bench.verify_curve_row(POINTS[2]) == ["4", "1", "3.00", "1.00", "0.750"]
  table = core_bench.verify_curve_table(POINTS)
  assert table.title == "verify step (forward + sampling + acceptance + compaction)"
  text = _text(table)
  for column in core_bench.VERIFY_COLUMNS:
    assert column in text
  assert "0.500" in text and "0.750" in text and "2.000" in text
  path = core_bench.plot_verify_curve(POINTS, str(tmp_path / "verify.png"))
  with open(path, "rb") as f:
    data = f.read()
  assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_generation_table_rows_and_json(tmp_path):
  full = _comparison()
  assert core_bench.generation_row(full) == [
      "2", "excluded", "12.0", "24.0", "2.00x", "2.50", "50%", "2, 6.0, 1.50", "9.0, 3.00",
      "12.5%", "NO", "1"]
  fresh_only = _comparison(proactive_mode="disabled", proactive_hit_rate=None,
                           after_hit=(0, None, None), fresh=(0, None, None),
                           identical_outputs=True, compiles_in_timed_runs=0)
  assert core_bench.generation_row(fresh_only)[1:2] + core_bench.generation_row(
      fresh_only)[6:] == ["disabled", "-", "-", "-", "12.5%", "yes", "0"]
  table = core_bench.generation_table([full, fresh_only], num_prompts=3, max_new_tokens=8,
                                     tree=full.tree)
  assert table.title == "greedy generation, 3 prompts x 8 tokens, tree (2, 3, 2, 6)"
  assert table.row_count == 2
  text = _text(table)
  for column in core_bench.GENERATION_COLUMNS:
    assert column in text
  assert "2, 6.0, 1.50" in text and "NO" in text and "yes" in text

  path = tmp_path / "core.json"
  core_bench.write_json(str(path), POINTS, [full])
  data = json.loads(path.read_text())
  assert set(data) == {"verify_curve", "generation"}
  assert data["verify_curve"][1] == {"batch_size": 1, "tree_tokens": 8, "median_ms": 4.0,
                                     "ratio_to_t1": 2.0}
  (generation,) = data["generation"]
  assert generation["speedup"] == 2.0 and generation["ar_tokens_per_s"] == 12.0
  assert generation["spec_tokens_per_s"] == 24.0 and generation["tree"]["max_budget"] == 6
  assert generation["after_hit"] == [2, 6.0, 1.5] and generation["proactive_mode"] == "excluded"


def test_acceptance_line_and_tree_spec():
  assert core_bench.parse_tree("32:4:16:32") == E.TreeParams(32, 4, 16, 32)
  line = core_bench.Acceptance("4:4:2:8", 2.3456, 10, True).line()
  assert line == ("tree 4:4:2:8: mean accepted tokens/verification 2.346 over 10 steps; "
                  "identical to target-only: True")


@pytest.mark.slow
def test_measure_acceptance_is_exact_on_the_tiny_pair(pair):
  target, draft = pair
  prompts = tiny_models.prompts(2, VOCAB, seed=3, max_len=10)
  seen = []
  results = core_bench.measure_acceptance(target, draft, prompts, ["2:3:2:6"], max_new_tokens=6,
                                          on_result=seen.append)
  assert results == seen and [r.tree_spec for r in results] == ["2:3:2:6"]
  assert results[0].identical and results[0].steps > 0 and results[0].mean_accepted >= 1.0
