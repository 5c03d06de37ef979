"""The grid runner end to end (`python -m launch.sweep`) on a tiny target/draft pair, and its
planning rules (which run serves which grid point) without any model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from specedge_jax.bench import sweep
from specedge_jax.serving.serving_config import ServingConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_sweep_writes_a_summary_per_system_and_point_and_the_plots(served_pair_dirs,
                                                                   compilation_cache, tmp_path):
  out_dir = tmp_path / "sweep"
  done = subprocess.run(
      [sys.executable, "-m", "launch.sweep",
       f"--config.models.target={served_pair_dirs['target']}",
       f"--config.models.draft={served_pair_dirs['draft']}",
       "--config.tree.max_n_beams=2", "--config.tree.max_beam_len=3",
       "--config.tree.max_branch_width=2", "--config.edge.requests_per_drafter=1",
       # One grid point (two runs: SpecEdge and its AR baseline) keeps this test's processes
       # few; which run serves which point over a larger grid is the planning tests' below.
       "--clients=2", "--batch_sizes=2", "--budgets=6", "--rtt_ms=1",
       # The speculative baseline takes the same path as the autoregressive one
       # (launch/server_only.py); it is left out to keep this test's compiles few.
       "--systems=specedge,server_only_ar",
       "--num_prompts=2", "--max_new_tokens=6", f"--out_dir={out_dir}",
       f"--compilation_cache_dir={compilation_cache}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "COLUMNS": "250"})
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert "Sweep" in done.stdout and "tok/s wall" in done.stdout, done.stdout

  report = json.loads((out_dir / "report.json").read_text())
  pairs = {(p["system"], p["point"]): p for p in report["points"]}
  assert set(pairs) == {(system, "c2-b2-t6-rtt1") for system in ("specedge", "server_only_ar")}
  for (system, point), entry in pairs.items():
    run = report["runs"][entry["run"]]
    assert run["system"] == system and point in run["points"]
    summary = run["summary"]
    assert summary["run"] == entry["run"]
    assert summary["requests"]["n_requests"] == 2 and summary["generated_tokens"] == 12
    # Greedy: every system emits the target's own tokens.
    assert entry["same_tokens_as_ar"] in (None, True)
    for path in run["event_files"]:
      assert (out_dir / path).is_file() and path.startswith(run["points"][0] + "/")
      # Tagged on disk, not only when the sweep reads them: launch/report.py can read the folder.
      tags = {json.loads(line).get("run_id") for line in (out_dir / path).read_text().splitlines()}
      assert tags == {entry["run"]}, (path, tags)
  spec = report["runs"][pairs[("specedge", "c2-b2-t6-rtt1")]["run"]]["summary"]
  # The SpecEdge run is its own (re-tagged) run with its two drafters.
  assert spec["n_edges"] == 2 and spec["requests"]["mean_tokens_per_step"] > 1.0
  assert pairs[("server_only_ar", "c2-b2-t6-rtt1")]["run"] != \
      pairs[("specedge", "c2-b2-t6-rtt1")]["run"]

  pngs = ["throughput_vs_clients.png", "itl_vs_clients.png", "itl_cdf.png",
          "accepted_length_hist.png"]
  pngs += [f"server_timeline_{name.replace('/', '_')}.png" for name in report["runs"]]
  for name in pngs:
    data = (out_dir / name).read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000, name

  # Replotting from the logs runs nothing and reproduces every summary and verdict.
  for name in pngs:
    (out_dir / name).unlink()
  result = sweep.replot(str(out_dir))
  assert json.loads((out_dir / "report.json").read_text()) == report
  assert {os.path.basename(p) for p in result.written} == set(pngs) | {"report.json"}
  assert all((out_dir / name).is_file() for name in pngs)


def _base(**edge) -> ServingConfig:
  return ServingConfig.from_mapping({
      "name": "t", "models": {"target": "t", "draft": "d"},
      "edge": {"num_drafters": 1, "requests_per_drafter": 2, **edge}})


def test_plan_shares_a_baseline_run_only_between_points_it_cannot_tell_apart(tmp_path):
  options = sweep.SweepOptions(out_dir=str(tmp_path), clients=(1, 2, 4), batch_sizes=(4,),
                               budgets=(8, 16), rtt_ms=(0.0, 14.0))
  runs = sweep.plan_runs(_base(), options)
  by_system = {s: [r for r in runs if r.system == s] for s in sweep.SYSTEMS}
  # SpecEdge runs every point; 3 clients x 2 budgets x 2 RTTs.
  assert len(by_system["specedge"]) == 12
  # With K=2: 1 client = 2 users (batch 2), 2 and 4 clients fill the batch of 4. RTT never
  # matters to a baseline, the budget only to the speculative one.
  assert len(by_system["server_only_ar"]) == 2
  assert len(by_system["server_only_spec"]) == 4
  ar_batches = sorted(r.config.server.max_batch_size for r in by_system["server_only_ar"])
  assert ar_batches == [2, 4]
  for run in by_system["server_only_spec"]:
    assert {p.budget for p in run.points} == {run.config.tree.max_budget}
  # Every (system, point) is served by exactly one run.
  served = [(r.system, p) for r in runs for p in r.points]
  assert len(served) == len(set(served)) == 3 * len(options.grid())
  spec = by_system["specedge"][0].config
  assert (spec.edge.num_drafters, spec.server.max_batch_size, spec.tree.max_budget,
          spec.edge.simulated_rtt_ms) == (1, 4, 8, 0.0)
  assert spec.server.num_slots >= 2


def test_proactive_modes_split_specedge_runs_only(tmp_path):
  options = sweep.SweepOptions(out_dir=str(tmp_path), clients=(1, 2), batch_sizes=(4,),
                               budgets=(8,), rtt_ms=(14.0,),
                               proactive_modes=("disabled", "excluded"))
  runs = sweep.plan_runs(_base(), options)
  spec = [r for r in runs if r.system == "specedge"]
  assert sorted(r.config.proactive.mode for r in spec) == ["disabled", "disabled", "excluded",
                                                           "excluded"]
  # Names of the default mode stay as before; the others say their mode.
  assert {r.name for r in spec} == {"specedge/c1-b4-t8-rtt14", "specedge/c2-b4-t8-rtt14",
                                    "specedge/c1-b4-t8-rtt14-pexcluded",
                                    "specedge/c2-b4-t8-rtt14-pexcluded"}
  # A baseline never drafts proactively, so both modes share its runs: one per client count.
  for system in ("server_only_ar", "server_only_spec"):
    baseline = [r for r in runs if r.system == system]
    assert len(baseline) == 2
    assert all(r.config.proactive.mode == "disabled" and len(r.points) == 2 for r in baseline)


@pytest.mark.parametrize("bad, match", [
    (dict(clients=(0, 1)), "clients"), (dict(clients=(2, 2)), "twice"),
    (dict(batch_sizes=()), "batch_sizes"), (dict(rtt_ms=(-1.0,)), "rtt_ms"),
    (dict(systems=("specedge", "vllm")), "vllm"), (dict(num_prompts=0), "num_prompts"),
    (dict(proactive_modes=("sometimes",)), "proactive_modes"),
    (dict(proactive_modes=("excluded", "excluded")), "twice"),
])
def test_bad_options_name_what_is_wrong(bad, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    sweep.SweepOptions(out_dir=str(tmp_path), **bad)


def test_replot_names_a_folder_that_is_not_a_sweep(tmp_path):
  with pytest.raises(ValueError, match="not a sweep report"):
    sweep.replot(str(tmp_path))
  (tmp_path / "report.json").write_text(json.dumps({"grid": {}}))
  with pytest.raises(ValueError, match="not a sweep report"):
    sweep.replot(str(tmp_path))


@pytest.mark.slow
def test_launcher_rejects_a_bad_grid_before_running_anything(tmp_path):
  done = subprocess.run([sys.executable, "-m", "launch.sweep", "--clients=1,x",
                         f"--out_dir={tmp_path / 'never'}"],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode != 0 and "--clients" in done.stderr, done.stderr[-2000:]
  assert not (tmp_path / "never").exists()
