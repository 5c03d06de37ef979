"""TTFT and ITL as the `openai` client sees them, beside `launch.report`'s figures of the same run.

    python -m launch.bench_http --num_requests=16 --concurrency=4 --out_dir=results/http

Starts the verifier and one HTTP edge with the embedded pair in this process
(`testing/live_stack.py`; the edge's simulated RTT and K from configs/embedded.py), sends the
embedded prompt set's chats (repeated to `num_requests`) as streaming chat completions from
`concurrency` client threads, and prints client-side and report-side TTFT and ITL in one table
(definitions in `bench/http_client.py`). Writes `http_latency.json` and `http_latency.png`.
"""

import json
import logging
import os
import tempfile

from absl import app, flags

_NUM_REQUESTS = flags.DEFINE_integer("num_requests", 16, "Requests sent in all.")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 2, "Client threads (at most K + the queue).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 48, "max_tokens of each request.")
_K = flags.DEFINE_integer("requests_per_drafter", 2, "K: requests interleaved on the edge.")
_OUT_DIR = flags.DEFINE_string("out_dir", "results/http", "Where the JSON and the plot go.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _NUM_REQUESTS.value < 1 or _CONCURRENCY.value < 1:
    raise app.UsageError("--num_requests and --concurrency must be >= 1")
  from rich.console import Console
  from rich.progress import Progress
  from rich.table import Table

  from specedge_jax.bench import http_client
  from specedge_jax.data import prompts
  from specedge_jax.measure import plots
  from specedge_jax.serving import runners
  from specedge_jax.testing.live_stack import LiveStack, embedded_config

  console = Console()
  for name in ("httpx", "httpx2"):  # one INFO line per request from the openai client
    logging.getLogger(name).setLevel(logging.WARNING)
  # Room in the queue for every client: a request holds its place until its slots are freed,
  # a moment after its client got the last chunk and sent the next request.
  config = embedded_config(requests_per_drafter=_K.value,
                           max_queued_requests=_CONCURRENCY.value)
  chats = [r["messages"] for r in prompts.load_records() if "messages" in r]
  if not chats:
    raise app.UsageError("the embedded prompt set has no chat records")
  conversations = [chats[i % len(chats)] for i in range(_NUM_REQUESTS.value)]
  events_path = os.path.join(tempfile.mkdtemp(prefix="bench_http_"), "edge.jsonl")
  with console.status("starting the verifier and the HTTP edge (loading, compiling) ..."):
    stack = LiveStack(config, events_path=events_path).__enter__()
  try:
    model = runners.served_model_name(config)
    with Progress(console=console) as progress:
      task = progress.add_task("streaming chat completions", total=len(conversations))
      timings = http_client.run_clients(
          stack.base_url, model, conversations, concurrency=_CONCURRENCY.value,
          max_tokens=_MAX_TOKENS.value, on_done=lambda: progress.advance(task))
  finally:
    stack.__exit__(None, None, None)
  comparison = http_client.compare_with_report(timings, events_path)
  table = Table(title=f"HTTP edge, {len(timings)} streamed chats, {_CONCURRENCY.value} at a "
                f"time (K={_K.value}, embedded pair, CPU)")
  for column in ("figure", "openai client", "launch.report (edge events)", "client / report"):
    table.add_column(column, justify="right" if column != "figure" else "left")
  for name, pair in comparison.items():
    client, report = pair["client"], pair["report"]
    scale = 1000.0 if name.endswith("_s") else 1.0
    label = name.removesuffix("_s") + (" (ms)" if name.endswith("_s") else "")
    fmt = (lambda v: "-" if v is None else f"{v * scale:.1f}") if scale != 1.0 else str
    ratio = f"{client / report:.3f}" if client and report else "-"
    table.add_row(label, fmt(client), fmt(report), ratio)
  console.print(table)
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  with open(os.path.join(_OUT_DIR.value, "http_latency.json"), "w") as f:
    json.dump({"flags": {"num_requests": _NUM_REQUESTS.value, "concurrency": _CONCURRENCY.value,
                         "max_tokens": _MAX_TOKENS.value, "requests_per_drafter": _K.value},
               "comparison": comparison}, f, indent=2)
  png = plots.plot_client_vs_report(comparison, os.path.join(_OUT_DIR.value, "http_latency.png"))
  console.print(f"wrote {_OUT_DIR.value}/http_latency.json and {png}")


if __name__ == "__main__":
  app.run(main)
