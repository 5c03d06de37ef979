"""Server-only baselines on the same workload and event format as SpecEdge.

  python -m launch.server_only --baseline=autoregressive --event_log=runs/ar.jsonl
  python -m launch.server_only --baseline=speculative --config.server.max_batch_size=4
  python -m launch.server_only --reference_yaml=config/server_only.example.yaml \
      --config.models.target=/models/Qwen3-14B --config.models.draft=/models/Qwen3-1.7B

'autoregressive': the target alone, batched decoding over KV slots. 'speculative': draft and
target both on the server, as in the reference. See specedge_jax/serving/baselines.py.

--reference_yaml reads one of the reference's YAML files (serving/reference_config.py): a
server_only file runs 'speculative', an auto_batch file 'autoregressive', and a specedge file the
given --baseline on its clients' requests. --config.<path>=value flags override its values; the
events go to <result_path>/<exp_name>/<system>.jsonl unless --event_log says otherwise.
"""

import os

from absl import app, flags
from ml_collections import config_flags
from rich.console import Console

from launch import serving_flags
from specedge_jax.measure import events as events_lib
from specedge_jax.measure import metrics, report
from specedge_jax.serving import baselines, reference_config, runners

_BASELINE = flags.DEFINE_enum("baseline", "autoregressive", list(baselines.BASELINES),
                              "Which server-only system to run.")
_REFERENCE_YAML = flags.DEFINE_string(
    "reference_yaml", None, "A reference SpecEdge YAML file (server_only, auto_batch or "
    "specedge) to run instead of --config; --config.<path>=value flags override its values.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  serving_flags.setup_process()
  kind, events_path = _BASELINE.value, serving_flags.EVENT_LOG.value
  if _REFERENCE_YAML.value:
    try:
      ref = reference_config.load_reference_yaml(_REFERENCE_YAML.value)
      config, kind = reference_config.to_server_only(
          ref, _BASELINE.value if flags.FLAGS["baseline"].present else None,
          config_flags.get_override_values(flags.FLAGS["config"]))
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    if not events_path:
      os.makedirs(ref.out_dir, exist_ok=True)
      events_path = os.path.join(ref.out_dir, f"{baselines.SYSTEM_NAMES[kind]}.jsonl")
  else:
    config = serving_flags.serving_config()
  outputs = runners.run_server_only(config, kind, events_path=events_path,
                                    run_id=serving_flags.RUN_ID.value)
  print(f"{len(outputs)} requests, {sum(len(o.tokens) for o in outputs)} tokens", flush=True)
  if events_path:
    _, summaries = metrics.summarize_events(events_lib.read_events([events_path]))
    Console().print(report.summary_table(summaries))


if __name__ == "__main__":
  app.run(main)
