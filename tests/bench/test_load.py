"""The serving load test (`bench/load.py`), briefly: faults injected, nothing lost or repeated."""

import asyncio

from specedge_jax.bench import load


def test_a_short_load_run_loses_and_repeats_no_token():
  config = load.LoadConfig(clients=3, requests_per_client=2, duration_s=2.0, max_requests=40,
                           max_new_tokens=24, num_slots=8, max_batch_size=4)
  report = asyncio.run(asyncio.wait_for(load.run_load(config), timeout=60))
  assert report.completed >= 6 and report.errors == {}, report.errors
  assert report.fault_counts["calls"] > 0
  assert (report.tokens_lost, report.tokens_repeated, report.mismatched_requests) == (0, 0, 0)
  names = [name for name, _ in report.rows()]
  assert "tokens lost / repeated" in names and "worst wait for a slot" in names


def test_compare_stream_counts_lost_and_repeated_tokens():
  assert load.compare_stream([1, 2, 3], [1, 2, 3]) == (0, 0, False)
  assert load.compare_stream([1, 3], [1, 2, 3]) == (1, 0, True)
  assert load.compare_stream([1, 2, 2, 3], [1, 2, 3]) == (0, 1, True)
  assert load.compare_stream([2, 1, 3], [1, 2, 3]) == (0, 0, True)
