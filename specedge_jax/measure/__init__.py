"""Measurement: what runs record and what is read back from it.

  events.py   the JSONL event schema every system writes (edge, server, baselines).
  metrics.py  run metrics from events (throughput per wall and per server-compute second, ITL,
              TTFT, acceptance, cost).
  report.py   tables and JSON over runs; plots.py the figures, one list for report and sweep.
"""
