"""The run report: event logs in, `report.json` + PNGs + rich tables (or one TSV) out.

This module wires `events.read_events`, `metrics`, `reference_metrics` and `plots` together and
formats the tables and the plain TSV. It computes no figure itself (`metrics.py` defines ours,
`reference_metrics.py` the reference's) and never prints: the launcher (`launch/report.py`)
prints what it returns.

Definitions: `definitions='ours'` (the default) reports our figures, 'reference' the reference's
(kaist-ina/specedge src/metric/*.py, per system kind), 'both' both. Every label of a figure that
the two sets define differently says which it is ('[ours]' / '[ref]'), and the summary table's
caption is the legend of the sets shown (`reference_metrics.LEGEND`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Callable, Iterable, Mapping, Sequence

from rich.markup import escape
from rich.table import Table

from specedge_jax.measure import events as events_lib
from specedge_jax.measure import metrics, plots
from specedge_jax.measure import reference_metrics as ref_lib

DEFINITIONS = ("ours", "reference", "both")

References = Mapping[str, ref_lib.ReferenceSummary]  # run name -> its reference figures


def definition_sets(definitions: str) -> tuple[str, ...]:
  """'ours' | 'reference' | 'both' -> the definition sets it shows."""
  if definitions not in DEFINITIONS:
    raise ValueError(f"definitions must be one of {DEFINITIONS}, got {definitions!r}")
  return ("ours", "reference") if definitions == "both" else (definitions,)


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


def _ms(stats: ref_lib.MeanStd | None) -> str:
  if stats is None or stats.mean is None:
    return "-"
  std = f"{stats.std * 1e3:.2f}" if stats.std is not None else "-"
  return f"{stats.mean * 1e3:.2f} ± {std}"


def summary_table(summaries: Sequence[metrics.RunSummary], reference: References | None = None,
                  definitions: str = "ours") -> Table:
  """One column per run, one row per figure; the legend of the definitions shown underneath."""
  sets = definition_sets(definitions)
  if "reference" in sets and reference is None:
    raise ValueError("the reference definitions need the runs' reference summaries")
  # Escaped: rich would read '[ours]' and '[ref]' as markup tags and drop them.
  table = Table(title="Run summary", caption=escape("\n".join(ref_lib.legend(sets))),
                caption_justify="left")
  table.add_column("metric")
  for summary in summaries:
    table.add_column(summary.run, justify="right")

  def row(label, getter):
    table.add_row(escape(label), *[getter(s) for s in summaries])

  row("system", lambda s: s.system)
  row("clients / edges", lambda s: f"{s.n_clients} / {s.n_edges}")
  row("requests", lambda s: str(s.requests.n_requests))
  row("generated tokens", lambda s: str(s.generated_tokens))
  row("wall time", lambda s: _fmt(s.wall_time_s, suffix=" s"))
  if "ours" in sets:
    _our_rows(table, summaries, row)
  if "reference" in sets:
    _reference_rows(table, summaries, reference or {})
  return table


def _our_rows(table: Table, summaries: Sequence[metrics.RunSummary], row: Callable) -> None:
  table.add_section()
  row("throughput (tok/s server compute) [ours]",
      lambda s: _fmt(s.throughput_per_compute_s, digits=1))
  row("throughput (tok/s wall) [ours]", lambda s: _fmt(s.throughput_per_wall_s, digits=1))
  row("server utilization", lambda s: _fmt(s.server_utilization, 100, 1, " %"))
  row("edge idle (mean per edge)", lambda s: _fmt(s.mean_edge_idle_s, suffix=" s") + (
      f" ({s.mean_edge_idle_fraction * 100:.1f} %)" if s.mean_edge_idle_fraction is not None
      else ""))
  table.add_section()
  row("TTFT mean / p99", lambda s: f"{_fmt(s.requests.ttft.mean_s, 1e3, 1)} / "
      f"{_fmt(s.requests.ttft.p99_s, 1e3, 1)} ms")
  row("ITL mean [ours]", lambda s: _fmt(s.requests.itl.mean_s, 1e3, 2, " ms"))
  row("ITL p50 / p99 [ours]", lambda s: f"{_fmt(s.requests.itl.p50_s, 1e3, 2)} / "
      f"{_fmt(s.requests.itl.p99_s, 1e3, 2)} ms")
  row("accepted depth per verification", lambda s: _fmt(s.requests.mean_accepted_depth))
  row("tokens per step (bonus incl.) [ours]", lambda s: _fmt(s.requests.mean_tokens_per_step))
  row("acceptance by depth (d=1,2,3)", lambda s: " ".join(
      _fmt(s.requests.acceptance_by_depth.get(d)) for d in (1, 2, 3)))
  row("proactive hit rate", lambda s: _fmt(s.requests.proactive_hit_rate, 100, 1, " %"))
  row("wasted tree tokens (not accepted)",
      lambda s: _fmt(s.requests.wasted_tree_token_fraction, 100, 1, " %"))
  row("edge drafting while server idle",
      lambda s: _fmt(s.mean_edge_draft_while_server_idle_s, 1.0, 2, " s"))
  table.add_section()
  row("cost server + edge [ours]",
      lambda s: f"${s.cost.server_usd:.4f} + ${s.cost.edge_usd:.4f}")
  row("tokens per $ [ours]", lambda s: _fmt(s.cost.tokens_per_usd, digits=0))
  row("$ per 1M tokens [ours]", lambda s: _fmt(s.cost.usd_per_million_tokens, digits=3))
  if any(s.itl_slo_s is not None for s in summaries):
    table.add_section()
    row("ITL SLO", lambda s: _fmt(s.itl_slo_s, 1e3, 1, " ms"))
    row("SLO attainment", lambda s: _fmt(s.requests.slo_attainment, 100, 1, " %"))
    row("goodput (tok/s)", lambda s: _fmt(s.requests.goodput_tokens_per_s, digits=1))


def _reference_rows(table: Table, summaries: Sequence[metrics.RunSummary],
                    reference: References) -> None:
  def row(label, getter):
    cells = []
    for summary in summaries:
      figures = reference.get(summary.run)
      cells.append("-" if figures is None else getter(figures))
    table.add_row(escape(label), *cells)

  table.add_section()
  row("definitions [ref]", lambda r: r.reference_script.removeprefix("src/"))
  row("throughput [ref] (tok/s)", lambda r: _fmt(r.throughput_tok_s, digits=1))
  row("  tokens / seconds counted [ref]",
      lambda r: f"{r.tokens_counted} / {_fmt(r.throughput_time_s, digits=3)} s "
      f"({'server log span' if r.kind == ref_lib.SPECEDGE else 'non-prefill iterations'})")
  row("ITL [ref] (ms/tok)", lambda r: _fmt(r.itl_s, 1e3, 3))
  row("  steps in / left out for a prefill [ref]",
      lambda r: f"{r.itl_steps} / {r.itl_excluded_prefill_steps}")
  row("tokens per step [ref] mean ± std", lambda r: f"{_fmt(r.tokens_per_step.mean)} ± "
      f"{_fmt(r.tokens_per_step.std)}")
  row("proactive ratio [ref]", lambda r: _fmt(r.proactive_ratio, 100, 1, " %"))
  table.add_section()
  for label, split in (("draft", "draft"), ("target (client-observed)", "target"),
                       ("whole step", "step")):
    for part, name in (("prefill", "prefill"), ("non-prefill", "non_prefill"),
                       ("after a hit", "after_hit")):
      row(f"{label} ms, {part} [ref]",
          lambda r, split=split, name=name: _ms(getattr(getattr(r, split), name)))
  row("draft-model prefill ms (edge_busy) [ref]", lambda r: _ms(r.draft_model_prefill))
  row("server per-batch ms, prefill [ref]", lambda r: _ms(r.server_batch.prefill))
  row("server per-batch ms, non-prefill [ref]", lambda r: _ms(r.server_batch.non_prefill))
  table.add_section()
  row("server / edge running time [ref]",
      lambda r: f"{_fmt(r.server_running_time_s, digits=3)} / "
      f"{_fmt(r.edge_running_time_s, digits=3)} s")
  row("cost server + edge [ref]", lambda r: f"{_usd(r.server_usd)} + {_usd(r.edge_usd)}")
  row("$ per 1M tokens [ref]", lambda r: _fmt(r.usd_per_million_tokens, digits=3))


def _usd(value: float | None) -> str:
  return "-" if value is None else f"${value:.4f}"


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


# The plain TSV: (header, getter) per column. Ours read a RunSummary, the reference's a
# ReferenceSummary; headers say which definition (`ours_` / `ref_`), times are in ms or s as named.
_COMMON_COLUMNS: tuple[tuple[str, Callable[[metrics.RunSummary], object]], ...] = (
    ("run", lambda s: s.run), ("system", lambda s: s.system),
    ("requests", lambda s: s.requests.n_requests),
    ("generated_tokens", lambda s: s.generated_tokens),
    ("wall_time_s", lambda s: s.wall_time_s),
)


def _scaled(value: float | None, scale: float) -> float | None:
  return None if value is None else value * scale


_OUR_COLUMNS: tuple[tuple[str, Callable[[metrics.RunSummary], object]], ...] = (
    ("ours_throughput_compute_tok_s", lambda s: s.throughput_per_compute_s),
    ("ours_throughput_wall_tok_s", lambda s: s.throughput_per_wall_s),
    ("ours_itl_mean_ms", lambda s: _scaled(s.requests.itl.mean_s, 1e3)),
    ("ours_itl_p50_ms", lambda s: _scaled(s.requests.itl.p50_s, 1e3)),
    ("ours_itl_p99_ms", lambda s: _scaled(s.requests.itl.p99_s, 1e3)),
    ("ours_ttft_mean_ms", lambda s: _scaled(s.requests.ttft.mean_s, 1e3)),
    ("ours_tokens_per_step", lambda s: s.requests.mean_tokens_per_step),
    ("ours_proactive_hit_pct", lambda s: _scaled(s.requests.proactive_hit_rate, 100)),
    ("ours_server_utilization_pct", lambda s: _scaled(s.server_utilization, 100)),
    ("ours_server_usd", lambda s: s.cost.server_usd),
    ("ours_edge_usd", lambda s: s.cost.edge_usd),
    ("ours_usd_per_1m_tokens", lambda s: s.cost.usd_per_million_tokens),
)


def _split_columns(name: str, split: str, parts: Sequence[str]):
  columns = []
  for part in parts:
    for stat in ("mean", "std"):
      columns.append((f"ref_{name}_{part}_{stat}_ms",
                      lambda r, split=split, part=part, stat=stat:
                      _scaled(getattr(getattr(getattr(r, split), part) or ref_lib.MeanStd.of(()),
                                      stat), 1e3)))
  return tuple(columns)


_STEP_PARTS = ("prefill", "non_prefill", "after_hit")
# In the order of the reference's own --plain rows (src/metric/specedge.py plain_text_print),
# with the throughput, which that row lacks, first.
_REFERENCE_COLUMNS: tuple[tuple[str, Callable[[ref_lib.ReferenceSummary], object]], ...] = (
    ("ref_kind", lambda r: r.kind),
    ("ref_throughput_tok_s", lambda r: r.throughput_tok_s),
    ("ref_tokens_counted", lambda r: r.tokens_counted),
    ("ref_throughput_time_s", lambda r: r.throughput_time_s),
    *_split_columns("draft", "draft", _STEP_PARTS),
    *_split_columns("target", "target", _STEP_PARTS),
    *_split_columns("server_batch", "server_batch", ("prefill", "non_prefill")),
    *_split_columns("step", "step", _STEP_PARTS),
    ("ref_proactive_ratio_pct", lambda r: _scaled(r.proactive_ratio, 100)),
    ("ref_tokens_per_step_mean", lambda r: r.tokens_per_step.mean),
    ("ref_tokens_per_step_std", lambda r: r.tokens_per_step.std),
    ("ref_itl_ms_per_token", lambda r: _scaled(r.itl_s, 1e3)),
    ("ref_server_running_time_s", lambda r: r.server_running_time_s),
    ("ref_server_usd", lambda r: r.server_usd),
    ("ref_edge_running_time_s", lambda r: r.edge_running_time_s),
    ("ref_edge_usd", lambda r: r.edge_usd),
    ("ref_usd_per_1m_tokens", lambda r: r.usd_per_million_tokens),
    ("ref_draft_model_prefill_mean_ms",
     lambda r: _scaled(r.draft_model_prefill.mean if r.draft_model_prefill else None, 1e3)),
    ("ref_draft_model_prefill_std_ms",
     lambda r: _scaled(r.draft_model_prefill.std if r.draft_model_prefill else None, 1e3)),
)


def _tsv_cell(value: object) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.6g}"
  return str(value).replace("\t", " ")


def plain_tsv(summaries: Sequence[metrics.RunSummary], reference: References | None = None,
              definitions: str = "ours") -> str:
  """A header line and one tab-separated line per run (empty cell: undefined), no formatting."""
  sets = definition_sets(definitions)
  columns: list[tuple[str, Callable]] = [
      (h, lambda s, r, g=g: g(s)) for h, g in (*_COMMON_COLUMNS,
                                               *(_OUR_COLUMNS if "ours" in sets else ()))]
  if "reference" in sets:
    if reference is None:
      raise ValueError("the reference definitions need the runs' reference summaries")
    columns += [(h, lambda s, r, g=g: None if r is None else g(r)) for h, g in _REFERENCE_COLUMNS]
  lines = ["\t".join(h for h, _ in columns)]
  for summary in summaries:
    figures = (reference or {}).get(summary.run)
    lines.append("\t".join(_tsv_cell(getter(summary, figures)) for _, getter in columns))
  return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class Report:
  summaries: list[metrics.RunSummary]
  reference: dict[str, ref_lib.ReferenceSummary]  # empty unless the reference set is shown
  tables: list[Table]
  tsv: str
  legend: list[str]
  written: list[str]


def make_report(event_paths: Sequence[str], out_dir: str,
                cost_config: metrics.CostConfig = metrics.CostConfig(),
                itl_slo_s: float | None = None, definitions: str = "ours") -> Report:
  """Reads the logs, writes `report.json` and the PNGs into `out_dir`; returns what to print.

  `report.json` keeps our summaries under "runs" whatever `definitions` is, and adds the
  reference's under "reference" when they are shown; "legend" says what each figure means.
  """
  sets = definition_sets(definitions)
  events = list(events_lib.read_events(event_paths))
  runs, summaries = metrics.summarize_events(events, cost_config, itl_slo_s)
  reference = (ref_lib.summarize_events(events, cost_config) if "reference" in sets else {})
  lines = ref_lib.legend(sets)
  os.makedirs(out_dir, exist_ok=True)
  report_path = os.path.join(out_dir, "report.json")
  content = {"event_files": list(event_paths), "definitions": list(sets), "legend": lines,
             "runs": {s.run: s.to_dict() for s in summaries}}
  if "reference" in sets:
    content["reference"] = {name: r.to_dict() for name, r in reference.items()}
  with open(report_path, "w") as f:
    json.dump(content, f, indent=2)
  written = [report_path, *plots.write_report_plots(
      out_dir, runs, summaries, reference=reference if "reference" in sets else None)]
  tables = ([summary_table(summaries, reference, definitions)]
            + [category_table(s) for s in summaries if s.categories])
  return Report(summaries=summaries, reference=reference, tables=tables,
                tsv=plain_tsv(summaries, reference, definitions), legend=lines, written=written)


def build_report(event_paths: Sequence[str], out_dir: str,
                 cost_config: metrics.CostConfig = metrics.CostConfig(),
                 itl_slo_s: float | None = None, definitions: str = "ours"
                 ) -> tuple[list[metrics.RunSummary], list[Table], list[str]]:
  """`make_report`, returning the run summaries, the tables to print, and the paths written."""
  made = make_report(event_paths, out_dir, cost_config, itl_slo_s, definitions)
  return made.summaries, made.tables, made.written
