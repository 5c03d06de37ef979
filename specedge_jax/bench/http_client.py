"""Latency as an HTTP user sees it: the `openai` client against the edge's API, beside the report.

`run_clients` sends chat completions with `stream: true` from `concurrency` threads and times
each on the client: TTFT is from sending the request to its first content chunk; ITL is the gap
between two chunks over the tokens of the later one (a chunk is one verification round), token
weighted, which is `metrics.py`'s definition applied to what the client received.
`compare_with_report` puts those beside the same figures that `launch.report` computes from the
edge's JSONL events of the same requests, so the two definitions can be checked against each
other: the client's include HTTP, JSON and detokenization, the report's start at the drafter.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Any, Callable, Sequence

import numpy as np

from specedge_jax.measure import events as events_lib
from specedge_jax.measure import metrics


@dataclasses.dataclass(frozen=True)
class ClientTiming:
  """One streamed request, timed by the client."""

  ttft_s: float
  itl_values_s: tuple[float, ...]  # per chunk after the first: gap / tokens of the chunk
  itl_weights: tuple[int, ...]  # tokens of those chunks
  completion_tokens: int
  chunks: int


def stream_chat(client, model: str, messages: list[dict[str, str]], max_tokens: int
                ) -> ClientTiming:
  """One greedy streamed chat completion, timed."""
  sent = time.perf_counter()
  stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                          temperature=0, stream=True,
                                          stream_options={"include_usage": True})
  arrivals: list[tuple[float, int]] = []  # (time, tokens) of each content chunk
  completion_tokens = 0
  for chunk in stream:
    now = time.perf_counter()
    if chunk.usage is not None:
      completion_tokens = chunk.usage.completion_tokens
    if not chunk.choices:
      continue
    tokens = int((chunk.model_extra or {}).get("specedge", {}).get("tokens", 0))
    if tokens:
      arrivals.append((now, tokens))
  if not arrivals:
    raise RuntimeError("the stream carried no token")
  values = tuple((t - t_prev) / n for (t_prev, _), (t, n) in zip(arrivals, arrivals[1:]))
  weights = tuple(n for _, n in arrivals[1:])
  return ClientTiming(ttft_s=arrivals[0][0] - sent, itl_values_s=values, itl_weights=weights,
                      completion_tokens=completion_tokens, chunks=len(arrivals))


def run_clients(base_url: str, model: str, conversations: Sequence[list[dict[str, str]]], *,
                concurrency: int, max_tokens: int, api_key: str = "unused",
                on_done: Callable[[], None] | None = None) -> list[ClientTiming]:
  """Every conversation once, `concurrency` at a time, with the official `openai` client."""
  import openai  # pylint: disable=g-import-not-at-top (a test/bench dependency)

  client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)

  def one(messages):
    timing = stream_chat(client, model, messages, max_tokens)
    if on_done is not None:
      on_done()
    return timing

  with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
    return list(pool.map(one, conversations))


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> float | None:
  return float(np.average(values, weights=weights)) if weights.sum() else None


def compare_with_report(timings: Sequence[ClientTiming], events_path: str) -> dict[str, Any]:
  """The client's TTFT and ITL beside the report's, from the edge's events of the same run."""
  _, summaries = metrics.summarize_events(events_lib.read_events([events_path]))
  if len(summaries) != 1:
    raise ValueError(f"{events_path}: expected one run, found {len(summaries)}")
  report = summaries[0].requests
  ttfts = np.asarray([t.ttft_s for t in timings])
  values = np.concatenate([np.asarray(t.itl_values_s) for t in timings])
  weights = np.concatenate([np.asarray(t.itl_weights, np.int64) for t in timings])
  samples = np.repeat(values, weights)
  return {
      "requests": {"client": len(timings), "report": report.n_requests},
      "ttft_mean_s": {"client": float(ttfts.mean()), "report": report.ttft.mean_s},
      "ttft_p50_s": {"client": float(np.percentile(ttfts, 50)), "report": report.ttft.p50_s},
      "itl_mean_s": {"client": _weighted_mean(values, weights), "report": report.itl.mean_s},
      "itl_p50_s": {"client": float(np.percentile(samples, 50)) if samples.size else None,
                    "report": report.itl.p50_s},
      "itl_p99_s": {"client": float(np.percentile(samples, 99)) if samples.size else None,
                    "report": report.itl.p99_s},
      "tokens": {"client": int(sum(t.completion_tokens for t in timings)),
                 "report": report.generated_tokens},
  }
