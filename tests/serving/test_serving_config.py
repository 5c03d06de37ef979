"""Serving configs (configs/*.py -> frozen ServingConfig), workload dealing and fitting."""

import importlib.util
import os

import pytest

from specedge_jax.serving import workload
from specedge_jax.serving.drafter import EdgeRequest
from specedge_jax.serving.serving_config import ServingConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILES = ("embedded.py", "qwen3_14b_1_7b.py", "qwen3_32b_1_7b.py")


def config_dict(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_files_build_and_round_trip_through_json(name, tmp_path):
  config = ServingConfig.from_mapping(config_dict(name))
  assert config.max_tree_nodes == config.tree.max_budget + 1
  path = tmp_path / "config.json"
  config.save_json(path)
  assert ServingConfig.load_json(path) == config


def test_launchers_read_the_embedded_config_by_default():
  from launch import serving_flags  # pylint: disable=g-import-not-at-top

  config = serving_flags.serving_config()
  assert config == ServingConfig.from_mapping(config_dict("embedded.py"))


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(colour="red"), "unknown keys ['colour']"),
    (lambda c: c["tree"].update(max_budgett=3), "config.tree: unknown keys ['max_budgett']"),
    (lambda c: c["models"].pop("target"), "config.models"),
    (lambda c: c["server"]["batching"].update(mode="eager"), "batching mode"),
    (lambda c: c["proactive"].update(mode="sometimes"), "proactive mode"),
    (lambda c: c["workload"].update(source="imagenet"), "workload.source"),
    (lambda c: c["workload"].update(top_p=0.0), "top_p"),
    (lambda c: c["edge"].update(simulated_rtt_ms=-1.0), "simulated_rtt_ms"),
    (lambda c: c["server"].update(num_slots=0), "server.num_slots"),
])
def test_bad_configs_are_refused_by_name(edit, message):
  mapping = config_dict("embedded.py").to_dict()
  edit(mapping)
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    ServingConfig.from_mapping(mapping)


def requests(lengths):
  return [EdgeRequest(request_id=f"r{i}", prompt_ids=(1,) * n) for i, n in enumerate(lengths)]


def test_shard_deals_round_robin_and_covers_everything_once():
  reqs = requests([1] * 7)
  shards = [workload.shard(reqs, i, 3) for i in range(3)]
  assert [[r.request_id for r in s] for s in shards] == [["r0", "r3", "r6"], ["r1", "r4"],
                                                          ["r2", "r5"]]
  with pytest.raises(ValueError, match="client_index 3"):
    workload.shard(reqs, 3, 3)


def test_check_fits_names_the_first_prompt_that_does_not_fit():
  mapping = config_dict("embedded.py").to_dict()
  mapping["server"]["max_len"] = 100
  mapping["tree"]["max_budget"] = 32
  mapping["workload"]["max_new_tokens"] = 40
  config = ServingConfig.from_mapping(mapping)  # 100 - 33-node tree - 40 = 27 prompt tokens
  workload.check_fits(requests([27, 5]), config)
  with pytest.raises(ValueError, match="longer than 27 tokens.*first: r1, 28 tokens"):
    workload.check_fits(requests([5, 28, 30]), config)
