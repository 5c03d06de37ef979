"""The static/dynamic batching rule of the verifier's engine thread, as pure functions of its
state: when a pending batch is ready (`batch_ready`), when it must run at the latest
(`wake_at`), and which sessions a static batch stops waiting for (`late_after_batch`).

`serving/engine_worker.EngineWorker` calls these with its own fields and the wall clock; the
capacity simulator (`sim/simulator.py`) calls them with its simulated state and clock, so both
follow one rule. The 'slo' mode's start time is `slo_scheduler.start_time`'s, passed in.
"""

from __future__ import annotations

from typing import Callable, Sequence

from specedge_jax.serving.serving_config import BatchingConfig


def wake_at(batching: BatchingConfig, oldest_enqueued_s: float) -> float:
  """static/dynamic: when the pending verifies run at the latest."""
  return oldest_enqueued_s + batching.deadline_s()


def batch_ready(batching: BatchingConfig, *, now: float, pending_slots: Sequence[int],
                oldest_enqueued_s: float, active_slots: set[int], late_slots: set[int],
                max_batch_size: int,
                slo_wake_at: Callable[[], float] | None = None) -> bool:
  """A full batch; or every due (active, not late) session has a verify pending; or the
  deadline passed ('slo': `slo_wake_at()`, called only when the first two do not decide, since
  it runs the scheduler)."""
  if len(pending_slots) >= max_batch_size:
    return True
  if active_slots - late_slots <= set(pending_slots):
    return True
  if batching.mode == "slo":
    if slo_wake_at is None:
      raise ValueError("the 'slo' mode needs slo_wake_at")
    return now >= slo_wake_at()
  return now >= wake_at(batching, oldest_enqueued_s)


def late_after_batch(batching: BatchingConfig, *, batch_slots: Sequence[int],
                     still_pending_slots: Sequence[int], active_slots: set[int],
                     late_slots: set[int], max_batch_size: int) -> set[int]:
  """The late set after a batch starts: a static batch that ran with room left waited for the
  due sessions that did not join; no batch waits for them again until they send a verify."""
  if batching.mode == "static" and len(batch_slots) < max_batch_size:
    present = set(batch_slots) | set(still_pending_slots)
    return late_slots | (active_slots - present)
  return set(late_slots)
