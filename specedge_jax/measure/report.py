"""The run report: event logs in, `report.json` + PNGs + rich tables out.

This module wires `events.read_events`, `metrics` and `plots` together and formats the tables.
It computes no figure itself (see `metrics.py` for every definition) and never prints: the
launcher (`launch/report.py`) prints the tables it returns.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterable, Sequence

from rich.table import Table

from specedge_jax.measure import events as events_lib
from specedge_jax.measure import metrics, plots


def expand_globs(patterns: Iterable[str]) -> list[str]:
  """The files matching any pattern, sorted; raises if a pattern matches nothing."""
  paths: list[str] = []
  for pattern in patterns:
    matched = sorted(glob.glob(pattern, recursive=True))
    if not matched:
      raise FileNotFoundError(f"--events pattern {pattern!r} matches no file")
    paths.extend(p for p in matched if p not in paths)
  return paths


def _fmt(value, scale: float = 1.0, digits: int = 2, suffix: str = "") -> str:
  if value is None:
    return "-"
  return f"{value * scale:.{digits}f}{suffix}"


def summary_table(summaries: Sequence[metrics.RunSummary]) -> Table:
  """One column per run, one row per figure."""
  table = Table(title="Run summary")
  table.add_column("metric")
  for summary in summaries:
    table.add_column(summary.run, justify="right")

  def row(label, getter):
    table.add_row(label, *[getter(s) for s in summaries])

  row("system", lambda s: s.system)
  row("clients / edges", lambda s: f"{s.n_clients} / {s.n_edges}")
  row("requests", lambda s: str(s.requests.n_requests))
  row("generated tokens", lambda s: str(s.generated_tokens))
  row("wall time", lambda s: _fmt(s.wall_time_s, suffix=" s"))
  table.add_section()
  row("throughput (tok/s server compute)", lambda s: _fmt(s.throughput_per_compute_s, digits=1))
  row("throughput (tok/s wall)", lambda s: _fmt(s.throughput_per_wall_s, digits=1))
  row("server utilization", lambda s: _fmt(s.server_utilization, 100, 1, " %"))
  row("edge idle (mean per edge)", lambda s: _fmt(s.mean_edge_idle_s, suffix=" s") + (
      f" ({s.mean_edge_idle_fraction * 100:.1f} %)" if s.mean_edge_idle_fraction is not None
      else ""))
  table.add_section()
  row("TTFT mean / p99", lambda s: f"{_fmt(s.requests.ttft.mean_s, 1e3, 1)} / "
      f"{_fmt(s.requests.ttft.p99_s, 1e3, 1)} ms")
  row("ITL mean", lambda s: _fmt(s.requests.itl.mean_s, 1e3, 2, " ms"))
  row("ITL p50 / p99", lambda s: f"{_fmt(s.requests.itl.p50_s, 1e3, 2)} / "
      f"{_fmt(s.requests.itl.p99_s, 1e3, 2)} ms")
  row("accepted depth per verification", lambda s: _fmt(s.requests.mean_accepted_depth))
  row("tokens per step (bonus incl.)", lambda s: _fmt(s.requests.mean_tokens_per_step))
  row("acceptance by depth (d=1,2,3)", lambda s: " ".join(
      _fmt(s.requests.acceptance_by_depth.get(d)) for d in (1, 2, 3)))
  row("proactive hit rate", lambda s: _fmt(s.requests.proactive_hit_rate, 100, 1, " %"))
  table.add_section()
  row("cost server + edge", lambda s: f"${s.cost.server_usd:.4f} + ${s.cost.edge_usd:.4f}")
  row("tokens per $", lambda s: _fmt(s.cost.tokens_per_usd, digits=0))
  row("$ per 1M tokens", lambda s: _fmt(s.cost.usd_per_million_tokens, digits=3))
  if any(s.itl_slo_s is not None for s in summaries):
    table.add_section()
    row("ITL SLO", lambda s: _fmt(s.itl_slo_s, 1e3, 1, " ms"))
    row("SLO attainment", lambda s: _fmt(s.requests.slo_attainment, 100, 1, " %"))
    row("goodput (tok/s)", lambda s: _fmt(s.requests.goodput_tokens_per_s, digits=1))
  return table


def category_table(summary: metrics.RunSummary) -> Table:
  """Request-level figures of one run split by Spec-Bench category."""
  table = Table(title=f"{summary.run}: by category")
  for column in ("category", "requests", "tokens", "TTFT mean ms", "ITL mean ms",
                 "ITL p99 ms", "accepted depth", "hit rate %", "SLO %", "goodput tok/s"):
    table.add_column(column, justify="left" if column == "category" else "right")
  for category, m in summary.categories.items():
    table.add_row(category, str(m.n_requests), str(m.generated_tokens),
                  _fmt(m.ttft.mean_s, 1e3, 1), _fmt(m.itl.mean_s, 1e3, 2),
                  _fmt(m.itl.p99_s, 1e3, 2), _fmt(m.mean_accepted_depth),
                  _fmt(m.proactive_hit_rate, 100, 1), _fmt(m.slo_attainment, 100, 1),
                  _fmt(m.goodput_tokens_per_s, digits=1))
  return table


def build_report(event_paths: Sequence[str], out_dir: str,
                 cost_config: metrics.CostConfig = metrics.CostConfig(),
                 itl_slo_s: float | None = None) -> tuple[list[metrics.RunSummary], list[Table],
                                                         list[str]]:
  """Reads the logs, writes `report.json` and the PNGs into `out_dir`.

  Returns the run summaries, the tables to print, and the paths written.
  """
  runs, summaries = metrics.summarize_events(events_lib.read_events(event_paths), cost_config,
                                             itl_slo_s)
  os.makedirs(out_dir, exist_ok=True)
  report_path = os.path.join(out_dir, "report.json")
  with open(report_path, "w") as f:
    json.dump({"event_files": list(event_paths),
               "runs": {s.run: s.to_dict() for s in summaries}}, f, indent=2)
  written = [report_path, *plots.write_report_plots(out_dir, runs, summaries)]
  tables = [summary_table(summaries)] + [category_table(s) for s in summaries if s.categories]
  return summaries, tables, written
