"""PNG figures of run metrics (matplotlib, Agg backend: no display needed).

This module only draws what `metrics.py` computed; it defines no figure of its own. Each
`plot_*` function writes one PNG and returns its path; `write_report_plots` is the one list of the
PNGs a results folder holds (the report and the sweep both write it) and `file_safe` the one
spelling of a run name inside a file name.
"""

from __future__ import annotations

import collections
import os
import re
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: servers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from specedge_jax.measure.metrics import Run, RunSummary  # noqa: E402
from specedge_jax.measure.reference_metrics import ReferenceSummary  # noqa: E402


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _by_system(summaries: Sequence[RunSummary]) -> dict[str, list[RunSummary]]:
  lines = collections.defaultdict(list)
  for summary in summaries:
    lines[summary.system].append(summary)
  return {system: sorted(runs, key=lambda s: s.n_clients) for system, runs in lines.items()}


def _clients_axis(ax, summaries: Sequence[RunSummary]) -> None:
  ax.set_xlabel("clients")
  ax.set_xticks(sorted({s.n_clients for s in summaries}))  # client counts are integers
  ax.grid(alpha=0.3)


def plot_throughput_vs_clients(summaries: Sequence[RunSummary], path: str,
                               reference: Mapping[str, ReferenceSummary] | None = None) -> str:
  """Generated tokens per second against the number of clients, a line per system: per
  wall-clock second (left) and per second of server compute (middle; SpecEdge's server
  throughput, which counts only the time the server GPU is busy), both our definitions. With
  `reference` (run name -> its `reference_metrics` summary) a third panel draws the reference's
  throughput, each system by its own script's definition."""
  panels = [("throughput_per_wall_s", "[ours] tokens / s of wall time"),
            ("throughput_per_compute_s", "[ours] tokens / s of summed server forward time")]
  if reference is not None:
    panels.append(("reference", ("[ref] SpecEdge: tokens / server log span;\n"
                                 "server-only: non-prefill tokens / non-prefill iteration time")))
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
  for ax, (attribute, label) in zip(axes, panels):
    for system, runs in _by_system(summaries).items():
      if attribute == "reference":
        values = [(s.n_clients, reference[s.run].throughput_tok_s if s.run in reference
                   else None) for s in runs]
      else:
        values = [(s.n_clients, getattr(s, attribute)) for s in runs]
      points = [(x, y) for x, y in values if y is not None]
      if points:
        ax.plot(*zip(*points), marker="o", label=system)
    ax.set_ylabel("throughput (tokens / s)")
    ax.set_title(label, fontsize="small")
    _clients_axis(ax, summaries)
  axes[0].legend(fontsize="small")
  return _save(fig, path)


def plot_itl_vs_clients(summaries: Sequence[RunSummary], path: str) -> str:
  """Mean (solid) and p99 (dashed) inter-token latency against clients, a colour per system."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for system, runs in _by_system(summaries).items():
    runs = [s for s in runs if s.requests.itl.mean_s is not None]
    if not runs:
      continue
    clients = [s.n_clients for s in runs]
    (line,) = ax.plot(clients, [s.requests.itl.mean_s * 1e3 for s in runs], marker="o",
                      label=f"{system} mean")
    ax.plot(clients, [s.requests.itl.p99_s * 1e3 for s in runs], marker="x", linestyle="--",
            color=line.get_color(), label=f"{system} p99")
  ax.set_ylabel("inter-token latency (ms)")
  _clients_axis(ax, summaries)
  ax.legend(fontsize="small")
  return _save(fig, path)


def plot_itl_cdf(runs: Sequence[Run], path: str) -> str:
  """Empirical CDF of the token-weighted ITL samples: a panel per system, a line per run, on a
  log time axis (ITL spans milliseconds to the occasional prefill-sized stall)."""
  by_system: dict[str, list[tuple[Run, np.ndarray]]] = collections.defaultdict(list)
  for run in runs:
    samples = np.sort(run.itl_samples())
    if samples.size:
      by_system[run.system].append((run, samples))
  panels = max(len(by_system), 1)
  fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4), sharey=True, squeeze=False)
  for ax, (system, system_runs) in zip(axes[0], by_system.items()):
    for run, samples in system_runs:
      # A run's name repeats its system (`system/point` in a sweep): label with the rest.
      label = run.name.removeprefix(f"{system}/") or run.name
      ax.step(samples * 1e3, np.arange(1, samples.size + 1) / samples.size, where="post",
              label=label)
    ax.set_xscale("log")
    ax.set_title(system)
    ax.set_xlabel("inter-token latency (ms, log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="x-small")
  axes[0][0].set_ylabel("fraction of tokens")
  axes[0][0].set_ylim(0, 1.02)
  return _save(fig, path)


def plot_accepted_length_histogram(summaries: Sequence[RunSummary], path: str) -> str:
  """Fraction of verifications by accepted depth (nodes accepted, bonus excluded), bars per run."""
  fig, ax = plt.subplots(figsize=(9, 4))
  with_data = [s for s in summaries if s.requests.accepted_depth_histogram]
  width = 0.8 / max(len(with_data), 1)
  for i, summary in enumerate(with_data):
    histogram: Mapping[int, int] = summary.requests.accepted_depth_histogram
    total = sum(histogram.values())
    depths = np.asarray(sorted(histogram), np.float64)
    ax.bar(depths + (i - (len(with_data) - 1) / 2) * width,
           [histogram[int(d)] / total for d in depths], width=width, label=summary.run)
  ax.set_xlabel("accepted depth per verification")
  ax.set_ylabel("fraction of verifications")
  ax.grid(alpha=0.3, axis="y")
  if with_data:  # beside the axes: many runs' labels would cover the bars
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return _save(fig, path)


def plot_server_timeline(run: Run, path: str) -> str:
  """The server's busy intervals (by op) and each edge's drafting intervals over the run."""
  edges = sorted(run.edge_busy)
  fig, ax = plt.subplots(figsize=(9, 1.2 + 0.35 * (1 + len(edges))))
  colours = {"verify": "tab:blue", "decode": "tab:green", "prefill": "tab:orange"}
  for op in sorted({b.op for b in run.batches}):
    spans = [(b.t_start - run.t_first, b.t_end - b.t_start) for b in run.batches if b.op == op]
    ax.broken_barh(spans, (0.6, 0.8), color=colours.get(op, "tab:gray"), label=f"server {op}")
  for row, client in enumerate(edges, start=1):
    spans = [(s - run.t_first, e - s) for s, e in run.edge_busy[client]]
    ax.broken_barh(spans, (row + 0.6, 0.8), color="tab:purple",
                   label="edge drafting" if row == 1 else None)
  ax.set_yticks([1 + i for i in range(1 + len(edges))],
                ["server"] + [f"edge {c}" for c in edges])
  ax.set_xlim(0, max(run.wall_time_s, 1e-9))
  ax.set_xlabel("time since run start (s); gaps are idle")
  ax.set_title(f"{run.name}: busy timeline")
  ax.legend(loc="upper right", fontsize="small")
  return _save(fig, path)


def file_safe(name: str) -> str:
  """`name` (a run or system name) as it appears in a file name: `[A-Za-z0-9_.-]`, others `_`."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_report_plots(out_dir: str, runs: Sequence[Run], summaries: Sequence[RunSummary],
                       line_summaries: Sequence[RunSummary] | None = None,
                       reference: Mapping[str, ReferenceSummary] | None = None) -> list[str]:
  """Every PNG of a results folder, in this order: throughput and ITL against clients (a line per
  `system` of `line_summaries`, which default to `summaries`; the throughput under the
  reference's definitions too when `reference` is given), the ITL CDF of `runs`, the
  accepted-length histogram of `summaries`, and one busy timeline per run. Returns the paths."""
  lines = summaries if line_summaries is None else line_summaries
  written = [
      plot_throughput_vs_clients(lines, os.path.join(out_dir, "throughput_vs_clients.png"),
                                 reference),
      plot_itl_vs_clients(lines, os.path.join(out_dir, "itl_vs_clients.png")),
      plot_itl_cdf(runs, os.path.join(out_dir, "itl_cdf.png")),
      plot_accepted_length_histogram(summaries,
                                     os.path.join(out_dir, "accepted_length_hist.png")),
  ]
  for run in runs:
    written.append(plot_server_timeline(
        run, os.path.join(out_dir, f"server_timeline_{file_safe(run.name)}.png")))
  return written


def plot_client_vs_report(comparison: Mapping[str, Mapping[str, float | None]], path: str) -> str:
  """Bars of the latency figures (`*_s` keys) as the HTTP client and as the report saw them
  (`bench/http_client.compare_with_report`)."""
  names = [n for n in comparison if n.endswith("_s")]
  x = np.arange(len(names))
  fig, ax = plt.subplots(figsize=(7, 3.5))
  for offset, side in ((-0.2, "client"), (0.2, "report")):
    values = [1000.0 * (comparison[n][side] or 0.0) for n in names]
    ax.bar(x + offset, values, width=0.4,
           label="openai client" if side == "client" else "launch.report (edge events)")
  ax.set_xticks(x, [n.removesuffix("_s") for n in names])
  ax.set_ylabel("ms")
  ax.set_title("Latency seen by the HTTP client vs the report")
  ax.legend()
  return _save(fig, path)
