"""The JSONL event schema shared by the verifier, the drafters, the baselines and the report.

Every process of a run appends one JSON object per line to its own log. The report
(`specedge_jax.measure.metrics`) reads any set of such logs. All times are `time.time()` wall-clock
seconds (the processes of a run share one machine clock); durations end in `_s`.

Event kinds and their fields (beyond `kind`, `system`, `t`):

  request_start   request_id, client_id, prompt_tokens, dataset, category
                  (one per user request, when the client submits it: a live HTTP request at
                  its arrival, a replayed one when it takes one of the edge's K places); an
                  edge adds queue_wait_s (the time from arrival to a place) and draft_model
                  (the name of the draft model folder it ran: edges may run different ones)
  request_step    request_id, client_id, n_tokens (tokens emitted to the user by this step,
                  bonus included), draft_time_s, wait_time_s, tree_size, accepted_depth (tree
                  nodes accepted, bonus excluded), proactive_hit (true/false, or null when
                  proactive drafting is off), phase ('prefill' | 'verify' | 'decode');
                  an edge's verify steps add server_queue_time_s, server_forward_time_s and
                  server_batch_size (the verifier's timing of that round), and first_round
                  (true on a speculative first round: the tree verified in the open itself,
                  which then has no 'prefill' step)
                  (one per verification round or decode step of a request, plus one 'prefill'
                  step for the first token; `t` is when the tokens reached the client)
  request_end     request_id, client_id, n_generated, output_tokens, finished_reason
                  ('eos' | 'length' | 'error' | 'cancelled': its user went away, e.g. an HTTP
                  client that disconnected); an edge adds error (the message, or null)
  server_batch    t_start, t_end, op, batch_size, tokens (tree/decode/prefill tokens in the
                  forward), forward_time_s, queue_time_s (mean wait of the batch's requests
                  before the forward), request_ids; the verifier's 'prefill' adds
                  prefill_cache_hit (tokens is 0 on a hit), its 'verify' adds accepted_depths
                  (tree nodes accepted per request, in request_ids order), truncated_nodes (tree
                  nodes the 'slo' batching cut off before the forward; tokens counts what was
                  verified) and estimated_time_s (the verify-time estimate of the batch as
                  verified, made before it ran). op is one of:
                    'prefill'        the target's prompt prefill (verifier, baselines)
                    'verify'         a batched tree verification (verifier, server_only_spec)
                    'decode'         a batched autoregressive step (server_only_ar)
                    'draft'          the server-side drafting of a step (server_only_spec)
                    'draft_prefill'  the server-side draft model's prefill (server_only_spec)
  edge_busy       client_id, t_start, t_end, op (an interval in which an edge GPU ran one job);
                  op is one of 'prefill' (draft prefill), 'draft' (tree growth), 'proactive'
                  (a proactive tree while the verify is in flight), 'commit' (taking the
                  verified result), 'abandon' (dropping a round the verifier never answered),
                  'close' (freeing the draft slot)
  request_resumed request_id, client_id, n_generated (tokens emitted before), reason (the
                  status that lost the session: 'UNAVAILABLE', 'NOT_FOUND', ...); an edge
                  re-opened the request in a new server session that continues it

`system` names what produced the log: 'specedge' (verifier and edge drafters), 'server_only_ar'
and 'server_only_spec' (the server-only baselines), 'layer_split' (the reference's layer-split
baseline: its tail server's 'prefill'/'decode' batches, its head edges' steps with phase
'prefill'/'decode' and edge_busy op 'prefill'/'decode'/'close').

Optional on any event: `run_id`, a name shared by all logs of one experiment run (for example
'specedge-c8'). The report groups events into runs by `run_id`, or by `system` when it is absent,
so a sweep over client counts gives each run its own `run_id`. Warm-up forwards are not logged:
the report takes a run's wall time as the span of its logged events.

Listeners (`EventLog.add_listener`) see every event right after it is written, so live consumers
(`specedge_jax.measure.prometheus`) are driven by exactly what the log holds.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Callable, Iterable, Iterator

_log = logging.getLogger(__name__)

Listener = Callable[[dict[str, Any]], None]

EVENT_KINDS = ("request_start", "request_step", "request_end", "server_batch", "edge_busy",
               "request_resumed")

REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "request_start": ("request_id", "client_id", "prompt_tokens"),
    "request_step": ("request_id", "client_id", "n_tokens"),
    "request_end": ("request_id", "client_id", "n_generated"),
    "server_batch": ("t_start", "t_end", "op", "batch_size", "tokens", "forward_time_s"),
    "edge_busy": ("client_id", "t_start", "t_end"),
    "request_resumed": ("request_id", "client_id", "n_generated"),
}


class EventLog:
  """Appends events to a JSONL file. Thread-safe; each line is flushed as written.

  A None path gives a log that only keeps events in memory (`events`), for tests.

  Listeners added with `add_listener` are called with each event dict after it is written, on the
  emitting thread and outside the lock (a slow listener must not serialize the emitters). They
  must not mutate the dict: it is the object kept in `events`.
  """

  def __init__(self, path: str | os.PathLike | None, system: str,
               keep_in_memory: bool | None = None):
    """`keep_in_memory` None keeps the events in `events` only when there is no file; False
    never keeps them (a log that only feeds its listeners, in a long-running server)."""
    self.system = system
    self._lock = threading.Lock()
    self._file = None
    # A tuple replaced on change: emit reads it without the lock and never sees it half-updated.
    self._listeners: tuple[Listener, ...] = ()
    self._listener_failures = 0
    if keep_in_memory is None:
      keep_in_memory = path is None
    self.events: list[dict[str, Any]] | None = [] if keep_in_memory else None
    if path is not None:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      self._file = open(path, "a", buffering=1)

  def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
    if kind not in EVENT_KINDS:
      raise ValueError(f"unknown event kind {kind!r}")
    event = {"kind": kind, "system": self.system, "t": fields.pop("t", time.time()), **fields}
    with self._lock:
      if self._file is not None:
        self._file.write(json.dumps(event) + "\n")
      if self.events is not None:
        self.events.append(event)
      listeners = self._listeners
    for listener in listeners:
      try:
        listener(event)
      except Exception:  # pylint: disable=broad-except (a consumer must never break the log)
        self._listener_failed(listener)
    return event

  def add_listener(self, callback: Listener) -> None:
    """Calls `callback(event)` for every event emitted from now on, after it is written."""
    with self._lock:
      self._listeners = (*self._listeners, callback)

  def remove_listener(self, callback: Listener) -> None:
    # By equality, not identity: each `obj.method` access makes a new (equal) bound method.
    with self._lock:
      self._listeners = tuple(cb for cb in self._listeners if cb != callback)

  def _listener_failed(self, listener: Listener) -> None:
    with self._lock:
      self._listener_failures += 1
      failures = self._listener_failures
    # The first failure with its traceback, then one line per 1000: a listener broken for good
    # must not flood the log with a traceback per event.
    if failures == 1 or failures % 1000 == 0:
      _log.exception("event listener %r failed (%d failures so far); event kept", listener,
                     failures)

  def close(self) -> None:
    with self._lock:
      if self._file is not None:
        self._file.close()
        self._file = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_events(paths: Iterable[str | os.PathLike]) -> Iterator[dict[str, Any]]:
  """Yields the events of JSONL files, validating kind and required fields.

  Raises ValueError naming the file and line of a malformed event.
  """
  for path in paths:
    with open(path) as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          event = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from e
        kind = event.get("kind") if isinstance(event, dict) else None
        if kind not in EVENT_KINDS:
          raise ValueError(f"{path}:{line_no}: unknown event kind {kind!r}")
        missing = [k for k in REQUIRED_FIELDS[kind] if k not in event]
        if missing:
          raise ValueError(f"{path}:{line_no}: {kind} event lacks {missing}")
        yield event
