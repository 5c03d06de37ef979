"""Server-only baselines on the same workload and event format as SpecEdge.

  python -m launch.server_only --baseline=autoregressive --event_log=runs/ar.jsonl
  python -m launch.server_only --baseline=speculative --config.server.max_batch_size=4

'autoregressive': the target alone, batched decoding over KV slots. 'speculative': draft and
target both on the server, as in the reference. See specedge_jax/serving/baselines.py.
"""

from absl import app, flags
from rich.console import Console

from launch import serving_flags
from specedge_jax.measure import events as events_lib
from specedge_jax.measure import metrics, report
from specedge_jax.serving import baselines, runners

_BASELINE = flags.DEFINE_enum("baseline", "autoregressive", list(baselines.BASELINES),
                              "Which server-only system to run.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  serving_flags.setup_process()
  config = serving_flags.serving_config()
  outputs = runners.run_server_only(config, _BASELINE.value,
                                    events_path=serving_flags.EVENT_LOG.value,
                                    run_id=serving_flags.RUN_ID.value)
  print(f"{len(outputs)} requests, {sum(len(o.tokens) for o in outputs)} tokens", flush=True)
  if serving_flags.EVENT_LOG.value:
    _, summaries = metrics.summarize_events(
        events_lib.read_events([serving_flags.EVENT_LOG.value]))
    Console().print(report.summary_table(summaries))


if __name__ == "__main__":
  app.run(main)
