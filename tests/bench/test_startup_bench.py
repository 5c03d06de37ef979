"""The start-up benchmark's log parsing: absl timestamps, JAX compile lines, import times, and the
phases of a child read from its log and events (no process is started)."""

from __future__ import annotations

import datetime
import json

from specedge_jax.bench import startup


def _absl(t: float, message: str, severity: str = "W") -> str:
  stamp = datetime.datetime.fromtimestamp(t)
  return f"{severity}{stamp:%m%d %H:%M:%S.%f} 1234 file.py:1] {message}\n"


def test_compile_stats_count_programs_hits_and_late_compiles(tmp_path):
  t0 = datetime.datetime(2026, 3, 4, 5, 6, 7, 250000).timestamp()
  log = tmp_path / "verifier.log"
  log.write_text("".join([
      _absl(t0, "Finished tracing verify for jit in 0.100000000 sec"),
      _absl(t0, "Finished jaxpr to MLIR module conversion jit(verify) in 0.200000000 sec"),
      _absl(t0, "Persistent compilation cache hit for 'jit_verify' with key 'k'"),
      _absl(t0, "Finished XLA compilation of jit(verify) in 0.050000000 sec"),
      _absl(t0 + 1, "Finished XLA compilation of jit(prefill_chunk) in 2.000000000 sec"),
      "import time:       100 |     200 | unrelated stderr line\n",
      _absl(t0 + 3, "Finished XLA compilation of jit(squeeze) in 0.010000000 sec"),
  ]))
  lines = startup._log_lines(str(log), 2026)  # pylint: disable=protected-access
  assert abs(lines[0][0] - t0) < 1e-3  # microseconds survive
  stats = startup.compile_stats(lines, ready=t0 + 2)
  assert (stats.programs, stats.cache_hits, stats.after_ready) == (3, 1, 1)
  assert abs(stats.trace_s - 0.1) < 1e-9 and abs(stats.lower_s - 0.2) < 1e-9
  assert abs(stats.cache_load_s - 0.05) < 1e-9 and abs(stats.compile_s - 2.01) < 1e-9


def test_import_seconds_take_each_package_once(tmp_path):
  log = tmp_path / "drafter0.log"
  log.write_text("import time: self [us] | cumulative | imported package\n"
                 "import time:       500 |     900000 |   jax\n"
                 "import time:       100 |    1000000 | specedge_jax.serving.runners\n"
                 "import time:       100 |    2000000 | transformers\n"
                 "import time:        10 |         10 |     jax\n")
  seconds = startup._import_seconds(str(log))  # pylint: disable=protected-access
  assert seconds == {"jax": 0.9, "transformers": 2.0, "(all, top level)": 3.0}


def test_drafter_phases_from_its_log_and_events(tmp_path):
  t0 = datetime.datetime(2026, 3, 4, 5, 6, 7).timestamp()
  (tmp_path / "drafter0.log").write_text(
      _absl(t0 + 4.0, "draft model loaded in 0.50 s", "I")
      + _absl(t0 + 5.0, "draft engine warmed up in 1.00 s", "I"))
  (tmp_path / "drafter0.jsonl").write_text(json.dumps(
      {"kind": "request_start", "system": "specedge", "t": t0 + 7.0}) + "\n")
  sampler = startup._Sampler(0)  # pylint: disable=protected-access
  sampler.created["drafter0"] = t0 + 1.0
  sampler.cpu_s["drafter0"] = 4.5
  trace = startup._child_trace(  # pylint: disable=protected-access
      "drafter0", "draft", str(tmp_path), sampler, t0, 2026, importtime=False)
  assert [what for what, _ in trace.phases] == [
      "imports, requests, tokenizer", "load the draft model", "warm-up (compile)",
      "wait for the verifier: first request"]
  assert [round(s, 3) for _, s in trace.phases] == [2.5, 0.5, 1.0, 2.0]
  assert trace.ready_at == 7.0 and trace.cpu_s == 4.5


def test_a_drafter_that_waited_for_another_warm_up(tmp_path):
  t0 = datetime.datetime(2026, 3, 4, 5, 6, 7).timestamp()
  (tmp_path / "drafter1.log").write_text(
      _absl(t0 + 4.0, "draft model loaded in 0.50 s", "I")
      + _absl(t0 + 7.0, "draft engine warmed up in 3.00 s (2.50 s of it waiting for another "
              "process's warm-up)", "I"))
  sampler = startup._Sampler(0)  # pylint: disable=protected-access
  sampler.created["drafter1"] = t0 + 1.0
  trace = startup._child_trace(  # pylint: disable=protected-access
      "drafter1", "draft", str(tmp_path), sampler, t0, 2026, importtime=False)
  assert [(what, round(s, 3)) for what, s in trace.phases] == [
      ("imports, requests, tokenizer", 2.5), ("load the draft model", 0.5),
      ("wait for another drafter's warm-up", 2.5), ("warm-up (compile)", 0.5)]
