"""Flags shared by the serving launchers (verifier, drafter, local, server_only).

Defined once here so that several launchers can be imported into one process (the tests do).
`--config` is an ml_collections config file with command-line overrides
(`--config.server.max_batch_size=4`); `--config_json` is a resolved config written by
`launch/local.py` for its children and replaces `--config` when given. `--allow_insecure` is
read by the verifier and the drafter (their TLS and token flags are their own); `launch/local.py`
has `--insecure_local` instead.
"""

import os

from absl import flags
from ml_collections import config_flags

from specedge_jax.serving import processes
from specedge_jax.serving.serving_config import ServingConfig

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "embedded.py")

CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Serving config file (get_config() -> ConfigDict); override fields "
    "with --config.<path>=value.")
CONFIG_JSON = flags.DEFINE_string(
    "config_json", None, "A resolved ServingConfig as JSON (written by launch/local.py); "
    "replaces --config.")
EVENT_LOG = flags.DEFINE_string("event_log", None, "Append JSONL events to this file.")
RUN_ID = flags.DEFINE_string("run_id", None, "Tag every event with this run id.")
CPUS = flags.DEFINE_string("cpus", "", "Pin this process to these cores, e.g. '0' or '1-3'.")
PARENT_PID = flags.DEFINE_integer(
    "parent_pid", None, "Exit when this process is gone (set by launch/local.py).")
ALLOW_INSECURE = flags.DEFINE_bool(
    "allow_insecure", False, "verifier, drafter: allow plaintext gRPC when no TLS flags are "
    "given (anyone on the network can read and inject traffic); otherwise refused.")


def serving_config() -> ServingConfig:
  if CONFIG_JSON.value:
    return ServingConfig.load_json(CONFIG_JSON.value)
  return ServingConfig.from_mapping(CONFIG.value)


def setup_process() -> None:
  """Core pinning (before XLA starts its threads) and the parent watchdog."""
  cpus = processes.parse_cpus(CPUS.value)
  if cpus:
    processes.pin_to_cpus(cpus)
  if PARENT_PID.value:
    processes.exit_with_parent(PARENT_PID.value)
