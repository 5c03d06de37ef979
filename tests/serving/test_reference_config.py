"""The reference's YAML configs (serving/reference_config.py) and its workload (workload.py's
reference mode): every documented key lands on its field, unknown keys are refused, keys with no
meaning here are noted, each client replays the whole set in the reference's shuffled order,
max_request_num is an end row, reasoning reaches the chat template; and the README's specedge
example, shrunk, runs end to end with greedy outputs equal to target-only decoding."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml

from specedge_jax.data import assets, datasets, tokenizers
from specedge_jax.serving import reference_config as rc
from specedge_jax.serving import workload
from specedge_jax.serving.serving_config import ServingConfig, WorkloadConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET, DRAFT = assets.DEFAULT_TARGET_DIR, assets.DEFAULT_DRAFT_DIR

# The README's three examples (config/*.example.yaml of kaist-ina/specedge, every documented key),
# with the models pointed at the embedded pair.
SPECEDGE_YAML = f"""
version: 1
opt: 2
base:
  result_path: "result/demo"
  exp_name: "specedge"
  dtype: fp16
  seed: 42
  ssh_key: ~/.ssh/id_ed25519_server
  max_len: 2048
server:
  process_name: server
  target_model: {TARGET}
  device: cuda:0
  temperature: 0.7
  max_batch_size: 1
  num_clients: 2
  batch_type: static
  cache_prefill: true
client:
  host: 127.0.0.1:8000
  process_name: client
  draft_model: {DRAFT}
  dataset: specbench
  reasoning: False
  sample_req_cnt: 8
  req_offset: 0
  max_n_beams: 32
  max_beam_len: 4
  max_branch_width: 16
  max_budget: 32
  proactive:
    type: excluded
    max_n_beams: 32
    max_beam_len: 3
    max_branch_width: 16
    max_budget: 32
  max_new_tokens: 64
  max_request_num: -1
node:
  localhost:
  - device: cuda:0
  - device: cuda:1
"""

SERVER_ONLY_YAML = f"""
base:
  result_path: "result/demo"
  exp_name: "server_only"
  dtype: fp16
  seed: 42
  ssh_key: ~/.ssh/id_ed25519_server
  max_len: 2048
server:
  process_name: server
  target_model: {TARGET}
  device: cuda:0
  temperature: 0.7
  num_clients: 1
client:
  host: 127.0.0.1:8000
  process_name: client
  draft_model: {DRAFT}
  dataset: specbench
  max_n_beams: 32
  max_beam_len: 4
  max_branch_width: 16
  max_budget: 64
  max_batch_size: 1
  max_new_tokens: 64
  max_request_num: -1
  sample_req_cnt: 8
  device: cuda:1
"""

AUTO_BATCH_YAML = f"""
base:
  result_path: result/demo
  exp_name: "auto_batch"
  seed: 42
  model: {TARGET}
  device: cuda:0
  dtype: fp16
  temperature: 0.0
  dataset: specbench
  batch_size: 1
  max_len: 2048
  max_new_tokens: 64
  max_request_num: -1
  sample_req_cnt: 8
"""
EXAMPLES = {"specedge": SPECEDGE_YAML, "server_only": SERVER_ONLY_YAML,
            "auto_batch": AUTO_BATCH_YAML}


def write(tmp_path, text_or_dict, name="config.yaml"):
  path = tmp_path / name
  text = text_or_dict if isinstance(text_or_dict, str) else yaml.safe_dump(text_or_dict)
  path.write_text(text)
  return str(path)


def edited(system, key, value):
  """The example of `system` with the dotted `key` set to `value`."""
  raw = yaml.safe_load(EXAMPLES[system])
  node = raw
  *parents, leaf = key.split(".")
  for part in parents:
    node = node.setdefault(part, {})
  node[leaf] = value
  return raw


def field(config, path):
  value = config
  for part in path.split("."):
    value = getattr(value, part)
  return value


# ------------------------------------------------------------------------------------------------
# The examples as a whole


@pytest.mark.parametrize("system", rc.SYSTEMS)
def test_readme_examples_load_as_their_system(system, tmp_path):
  ref = rc.load_reference_yaml(write(tmp_path, EXAMPLES[system]))
  assert ref.system == system  # inferred from the sections
  assert ref.baseline == rc.BASELINE_OF[system]
  assert ref.out_dir == os.path.join("result/demo", system)
  config = ref.config
  assert config.name == system and config.models.target == TARGET
  assert config.models.dtype == "fp16" and config.workload.seed == 42
  assert config.server.max_len == config.edge.max_len == 2048
  assert config.workload.source == "specbench" and config.workload.sample_req_cnt == 8
  assert config.workload.end_row == -1 and config.workload.num_requests == 0
  assert config.workload.max_new_tokens == 64
  assert ServingConfig.from_mapping(config.to_dict()) == config  # a plain, valid config


def test_specedge_example_maps_to_the_reference_workload(tmp_path):
  config = rc.load_reference_yaml(write(tmp_path, SPECEDGE_YAML)).config
  assert config.models.draft == DRAFT
  assert config.workload.mode == "reference" and config.edge.requests_per_drafter == 1
  assert config.edge.num_drafters == 2 and config.server.num_slots == 2
  assert config.server.max_batch_size == 1 and config.server.batching.mode == "static"
  assert (config.tree.max_n_beams, config.tree.max_beam_len, config.tree.max_branch_width,
          config.tree.max_budget) == (32, 4, 16, 32)
  assert config.proactive.mode == "excluded"
  assert (config.proactive.max_n_beams, config.proactive.max_beam_len,
          config.proactive.max_branch_width, config.proactive.max_budget) == (32, 3, 16, 32)
  assert config.workload.temperature == 0.7 and config.workload.top_p == 1.0
  assert config.workload.reasoning is False and config.workload.req_offset == 0


def test_server_only_and_auto_batch_examples(tmp_path):
  server_only = rc.load_reference_yaml(write(tmp_path, SERVER_ONLY_YAML)).config
  # One client in random.seed(0) order, from row 0; the batch is the server's.
  assert server_only.workload.mode == "reference" and server_only.edge.num_drafters == 1
  assert server_only.server.max_batch_size == server_only.server.num_slots == 1
  assert server_only.tree.max_budget == 64 and server_only.proactive.mode == "disabled"
  auto_batch = rc.load_reference_yaml(write(tmp_path, AUTO_BATCH_YAML)).config
  assert auto_batch.workload.mode == "sharded"  # file order, no shuffle
  assert auto_batch.models.draft == TARGET and auto_batch.workload.temperature == 0.0
  assert auto_batch.server.max_batch_size == auto_batch.server.num_slots == 1


# Every key of every system, changed to a distinct value, and where it must land.
KEY_CASES = {
    "specedge": [
        ("base.dtype", "fp32", "models.dtype", "fp32"),
        ("base.seed", 7, "workload.seed", 7),
        ("base.max_len", 300, "server.max_len", 300),
        ("base.max_len", 300, "edge.max_len", 300),
        ("base.exp_name", "exp1", "name", "exp1"),
        ("server.target_model", "/t", "models.target", "/t"),
        ("server.temperature", 0, "workload.temperature", 0.0),
        ("server.max_batch_size", 2, "server.max_batch_size", 2),
        ("server.batch_type", "dynamic", "server.batching.mode", "dynamic"),
        ("server.cache_prefill", False, "server.prefill_cache_entries", 0),
        ("client.draft_model", "/d", "models.draft", "/d"),
        ("client.dataset", "C4", "workload.source", "c4"),
        ("client.reasoning", True, "workload.reasoning", True),
        ("client.reasoning", "True", "workload.reasoning", True),  # as the env var reads it
        ("client.sample_req_cnt", 3, "workload.sample_req_cnt", 3),
        ("client.req_offset", 5, "workload.req_offset", 5),
        ("client.max_n_beams", 5, "tree.max_n_beams", 5),
        ("client.max_beam_len", 6, "tree.max_beam_len", 6),
        ("client.max_branch_width", 7, "tree.max_branch_width", 7),
        ("client.max_budget", 9, "tree.max_budget", 9),
        ("client.proactive.type", "included", "proactive.mode", "included"),
        ("client.proactive.max_n_beams", 3, "proactive.max_n_beams", 3),
        ("client.proactive.max_beam_len", 2, "proactive.max_beam_len", 2),
        ("client.proactive.max_branch_width", 4, "proactive.max_branch_width", 4),
        ("client.proactive.max_budget", 5, "proactive.max_budget", 5),
        ("client.max_new_tokens", 9, "workload.max_new_tokens", 9),
        ("client.max_request_num", 40, "workload.end_row", 40),
    ],
    "server_only": [
        ("base.dtype", "bf16", "models.dtype", "bf16"),
        ("base.seed", 7, "workload.seed", 7),
        ("base.max_len", 300, "server.max_len", 300),
        ("base.exp_name", "exp1", "name", "exp1"),
        ("server.target_model", "/t", "models.target", "/t"),
        ("server.temperature", 0.5, "workload.temperature", 0.5),
        ("server.num_clients", 4, "edge.num_drafters", 1),  # server_only.py forces one
        ("client.draft_model", "/d", "models.draft", "/d"),
        ("client.dataset", "oasst", "workload.source", "oasst"),
        ("client.max_n_beams", 5, "tree.max_n_beams", 5),
        ("client.max_beam_len", 6, "tree.max_beam_len", 6),
        ("client.max_branch_width", 7, "tree.max_branch_width", 7),
        ("client.max_budget", 9, "tree.max_budget", 9),
        ("client.max_batch_size", 3, "server.max_batch_size", 3),
        ("client.max_batch_size", 3, "server.num_slots", 3),
        ("client.max_new_tokens", 9, "workload.max_new_tokens", 9),
        ("client.max_request_num", 40, "workload.end_row", 40),
        ("client.sample_req_cnt", 3, "workload.sample_req_cnt", 3),
    ],
    "auto_batch": [
        ("base.dtype", "fp32", "models.dtype", "fp32"),
        ("base.seed", 7, "workload.seed", 7),
        ("base.exp_name", "exp1", "name", "exp1"),
        ("base.model", "/m", "models.target", "/m"),
        ("base.temperature", 0.7, "workload.temperature", 0.0),  # auto_batch.py is greedy
        ("base.dataset", "wikitext", "workload.source", "wikitext"),
        ("base.batch_size", 4, "server.max_batch_size", 4),
        ("base.batch_size", 4, "server.num_slots", 4),
        ("base.max_len", 300, "server.max_len", 300),
        ("base.max_new_tokens", 9, "workload.max_new_tokens", 9),
        ("base.max_request_num", 40, "workload.end_row", 40),
        ("base.sample_req_cnt", 3, "workload.sample_req_cnt", 3),
    ],
}
# Keys checked elsewhere in this file: out_dir, node and num_clients, cache_prefill's count.
CHECKED_ELSEWHERE = {"base.result_path", "node", "server.num_clients", "server.cache_prefill"}


@pytest.mark.parametrize("system,key,value,path,expected", [
    (system, *case) for system, cases in KEY_CASES.items() for case in cases])
def test_every_key_lands_on_its_field(system, key, value, path, expected, tmp_path):
  ref = rc.load_reference_yaml(write(tmp_path, edited(system, key, value)))
  assert field(ref.config, path) == expected


@pytest.mark.parametrize("system", rc.SYSTEMS)
def test_the_key_cases_cover_every_key(system):
  covered = {case[0] for case in KEY_CASES[system]} | set(rc.NO_MEANING) | CHECKED_ELSEWHERE
  assert set(rc.KEYS[system]) <= covered, set(rc.KEYS[system]) - covered


def test_result_path_and_exp_name_give_the_run_folder(tmp_path):
  raw = edited("specedge", "base.result_path", str(tmp_path / "res"))
  raw["base"]["exp_name"] = "exp7"
  ref = rc.load_reference_yaml(write(tmp_path, raw))
  assert ref.out_dir == str(tmp_path / "res" / "exp7")
  config, options = rc.to_local(ref)
  assert config == ref.config and options == {"out_dir": ref.out_dir}


def test_node_lists_the_clients_and_must_agree_with_num_clients(tmp_path):
  raw = yaml.safe_load(SPECEDGE_YAML)
  raw["node"] = {"localhost": [{"device": "cuda:0"}], "edge2": [{"device": "cuda:0"},
                                                                {"device": "cuda:1"}]}
  raw["server"]["num_clients"] = 3
  ref = rc.load_reference_yaml(write(tmp_path, raw))
  assert ref.config.edge.num_drafters == 3 and ref.config.server.num_slots == 3
  assert any(n.startswith("`node`") and "3 edge clients" in n for n in ref.notes)
  raw["server"]["num_clients"] = 2
  with pytest.raises(ValueError, match="num_clients` = 2 but `node` lists 3"):
    rc.load_reference_yaml(write(tmp_path, raw))
  raw["node"] = {"localhost": [{"device": "cuda:0", "gpu_mem": 24}]}
  with pytest.raises(ValueError, match="take only `device`"):
    rc.load_reference_yaml(write(tmp_path, raw))


def test_cache_prefill_sizes_the_snapshot_cache_to_the_sampled_set(tmp_path):
  raw = edited("specedge", "client.dataset", "embedded")
  raw["client"].update(req_offset=2, max_request_num=12, sample_req_cnt=3)  # rows 2 5 8 11
  ref = rc.load_reference_yaml(write(tmp_path, raw))
  assert ref.config.server.prefill_cache_entries == 4
  assert any("prefill_cache_entries = 4" in n for n in ref.notes)
  # A file that is not there: a fixed room, and a note that says so.
  ref = rc.load_reference_yaml(write(tmp_path, SPECEDGE_YAML), dataset_dir=str(tmp_path))
  assert ref.config.server.prefill_cache_entries == 64
  assert any("could not be counted" in n for n in ref.notes)


@pytest.mark.skipif(not os.path.isdir(datasets.DEFAULT_DATASET_DIR),
                    reason=f"no prompt sets at {datasets.DEFAULT_DATASET_DIR}")
def test_cache_prefill_counts_the_specbench_rows(tmp_path):
  ref = rc.load_reference_yaml(write(tmp_path, SPECEDGE_YAML))
  assert ref.config.server.prefill_cache_entries == 60  # 480 rows, every 8th


# ------------------------------------------------------------------------------------------------
# Refusals and notes


def test_unknown_keys_are_refused_by_name(tmp_path):
  with pytest.raises(ValueError, match=r"unknown keys \['client.colour'\].*known: \["):
    rc.load_reference_yaml(write(tmp_path, edited("specedge", "client.colour", "red")))
  with pytest.raises(ValueError, match=r"unknown keys \['extras.x'\]"):
    rc.load_reference_yaml(write(tmp_path, edited("server_only", "extras.x", 1)))


@pytest.mark.parametrize("system", rc.SYSTEMS)
def test_keys_without_meaning_here_are_noted_one_by_one(system, tmp_path):
  ref = rc.load_reference_yaml(write(tmp_path, EXAMPLES[system]))
  present = [k for k in rc.KEYS[system] if k in rc.NO_MEANING and _has(system, k)]
  assert present  # every example has some (ssh_key, process_name, device, host, ...)
  for key in present:
    assert any(n.startswith(f"`{key}`") and "no meaning here" in n for n in ref.notes), key


def _has(system, key):
  node = yaml.safe_load(EXAMPLES[system])
  for part in key.split("."):
    if not isinstance(node, dict) or part not in node:
      return False
    node = node[part]
  return True


def test_a_key_of_another_system_is_noted_not_refused(tmp_path):
  # server_only.py reads neither reasoning nor req_offset (it starts at row 0).
  raw = edited("server_only", "client.reasoning", True)
  raw["client"]["req_offset"] = 8
  ref = rc.load_reference_yaml(write(tmp_path, raw))
  assert ref.config.workload.reasoning is False and ref.config.workload.req_offset == 0
  assert sum("read only by the reference's client_host.py" in n for n in ref.notes) == 2


def test_behaviour_differences_are_noted(tmp_path):
  ref = rc.load_reference_yaml(write(tmp_path, SPECEDGE_YAML))
  assert any("top_p=0.8" in n for n in ref.notes)  # the reference's sampler default
  ref = rc.load_reference_yaml(write(tmp_path, edited("auto_batch", "base.temperature", 0.7)))
  assert any("decodes greedily" in n for n in ref.notes)
  assert any("dataset[:-1]" in n for n in ref.notes)


@pytest.mark.parametrize("system,key,value,message", [
    ("specedge", "client.reasoning", "yes", "must be true or false"),
    ("specedge", "server.cache_prefill", "true", "must be true or false"),  # not "True"
    ("specedge", "base.dtype", "int8", "base.dtype"),
    ("specedge", "client.dataset", "imagenet", "client.dataset"),
    ("specedge", "server.batch_type", "eager", "batch_type"),
    ("specedge", "client.max_request_num", 0, "end row"),
    ("specedge", "client.max_request_num", -2, "end row"),
    ("specedge", "client.max_new_tokens", "64", "must be int"),
    ("specedge", "client.proactive.type", "sometimes", "proactive mode"),
    ("auto_batch", "base.batch_size", True, "must be int"),
])
def test_bad_values_are_refused_by_key(system, key, value, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    rc.load_reference_yaml(write(tmp_path, edited(system, key, value)))


def test_the_system_is_inferred_or_given(tmp_path):
  path = write(tmp_path, SERVER_ONLY_YAML)
  assert rc.load_reference_yaml(path).system == "server_only"
  with pytest.raises(ValueError, match="`base.dataset` is required"):  # read as auto_batch
    rc.load_reference_yaml(path, system="auto_batch")
  with pytest.raises(ValueError, match="unknown reference system"):
    rc.load_reference_yaml(path, system="layer_split")
  with pytest.raises(ValueError, match="cannot tell which reference system"):
    rc.load_reference_yaml(write(tmp_path, {"base": {"seed": 1}}))
  with pytest.raises(ValueError, match="required"):
    rc.load_reference_yaml(write(tmp_path, {"base": {"model": TARGET}}))  # no dataset


def test_launch_entry_points(tmp_path):
  specedge = rc.load_reference_yaml(write(tmp_path, SPECEDGE_YAML, "s.yaml"))
  server_only = rc.load_reference_yaml(write(tmp_path, SERVER_ONLY_YAML, "so.yaml"))
  with pytest.raises(ValueError, match="launch.server_only --reference_yaml"):
    rc.to_local(server_only)
  with pytest.raises(ValueError, match="give --baseline"):
    rc.to_server_only(specedge)
  config, kind = rc.to_server_only(specedge, "autoregressive",
                                   {"workload.max_new_tokens": 5, "models.target": "/x"})
  assert kind == "autoregressive" and config.workload.max_new_tokens == 5
  assert config.models.target == "/x" and config.workload.mode == "reference"
  assert rc.to_server_only(server_only)[1] == "speculative"
  with pytest.raises(ValueError, match="requests_per_drafter=1"):  # overrides are checked
    rc.to_local(specedge, {"edge.requests_per_drafter": 2})
  with pytest.raises(ValueError, match="no section"):
    rc.apply_overrides(specedge.config, {"colour.red": 1})


# ------------------------------------------------------------------------------------------------
# The workload: modes, end row, reasoning


def embedded_config(**workload_fields) -> ServingConfig:
  edge = {"num_drafters": workload_fields.pop("num_drafters", 3)}
  if workload_fields.get("mode") == "reference":
    edge["requests_per_drafter"] = 1
  return ServingConfig.from_mapping({
      "name": "t", "models": {"target": TARGET, "draft": DRAFT}, "edge": edge,
      "server": {"max_len": 512}, "tree": {"max_budget": 8},
      "workload": {"source": "embedded", "num_requests": 0, **workload_fields}})


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizers.load_tokenizer(TARGET)


def test_reference_mode_gives_every_client_the_whole_set_in_its_shuffled_order(tokenizer):
  config = embedded_config(mode="reference", req_offset=1, end_row=30, sample_req_cnt=2,
                           seed=5)
  rows = datasets.sample_rows(42, 1, 2, 30)
  requests = workload.load_requests(config, tokenizer)
  assert [r.request_id for r in requests] == [f"embedded-{i}" for i in rows]
  seen_ids, seen_seeds = set(), set()
  for client in range(3):
    served = workload.requests_for_client(config, client, requests)
    order = datasets.client_order([datasets.Prompt("embedded", i, "") for i in rows], client)
    assert [r.request_id for r in served] == [f"c{client}-embedded-{p.index}" for p in order]
    by_id = {r.request_id: r for r in requests}
    assert all(r.prompt_ids == by_id[r.request_id.split("-", 1)[1]].prompt_ids for r in served)
    seen_ids |= {r.request_id for r in served}
    seen_seeds |= {r.seed for r in served}
  assert len(seen_ids) == len(seen_seeds) == 3 * len(rows)  # unique over clients and requests
  assert config.workload.client_share(len(rows), 1, 3) == len(rows)
  # The server-only equivalent: every client's copy, in rounds of one request per client.
  union = workload.server_only_requests(config, requests)
  assert len(union) == config.workload.server_only_total(len(rows), 3) == 3 * len(rows)
  assert [r.request_id.split("-")[0] for r in union[:6]] == ["c0", "c1", "c2"] * 2
  assert {r.request_id for r in union} == seen_ids


def test_one_reference_client_is_the_reference_server_only_order(tokenizer):
  config = embedded_config(mode="reference", num_drafters=1, end_row=20)
  requests = workload.load_requests(config, tokenizer)
  order = datasets.client_order([datasets.Prompt("embedded", i, "") for i in range(20)], 0)
  assert [r.request_id for r in workload.server_only_requests(config, requests)] == [
      f"c0-embedded-{p.index}" for p in order]  # server_only.py: random.seed(0); shuffle


def test_sharded_mode_is_unchanged(tokenizer):
  config = embedded_config(num_requests=8)
  requests = workload.load_requests(config, tokenizer)
  assert [r.request_id for r in requests] == [f"embedded-{i}" for i in range(8)]
  assert [r.seed for r in requests] == list(range(8))
  for client in range(3):
    assert workload.requests_for_client(config, client, requests) == \
        workload.shard(requests, client, 3)
  assert workload.server_only_requests(config, requests) == requests
  assert [config.workload.client_share(8, i, 3) for i in range(3)] == [3, 3, 2]


def test_max_request_num_is_an_end_row_not_a_count(tokenizer, tmp_path):
  raw = edited("specedge", "client.dataset", "embedded")
  raw["client"].update(req_offset=4, max_request_num=10, sample_req_cnt=2)
  config = rc.load_reference_yaml(write(tmp_path, raw)).config
  assert config.workload.end_row == 10
  assert [r.request_id for r in workload.load_requests(config, tokenizer)] == [
      "embedded-4", "embedded-6", "embedded-8"]  # rows [4, 10), every 2nd: 3, not 10


def test_workload_config_refusals():
  for fields, message in [({"mode": "round"}, "workload.mode"),
                          ({"end_row": 0}, "exclusive end row"),
                          ({"req_offset": 5, "end_row": 5}, "exclusive end row"),
                          ({"sample_req_cnt": 0}, "sample_req_cnt"),
                          ({"req_offset": -1}, "req_offset"),
                          ({"reasoning": "False"}, "reasoning")]:
    with pytest.raises(ValueError, match=message):
      WorkloadConfig(**fields)
  with pytest.raises(ValueError, match="set edge.requests_per_drafter=1"):
    ServingConfig.from_mapping({"name": "t", "models": {"target": "a", "draft": "b"},
                                "workload": {"mode": "reference"}})


# A Qwen3-style template: reads `enable_thinking` and, when false, pre-fills an empty think block.
QWEN3_LIKE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}")


def test_reasoning_reaches_the_specbench_chat_template(tmp_path):
  thinking = tokenizers.load_tokenizer(TARGET)
  thinking.chat_template = QWEN3_LIKE_TEMPLATE
  rows = [{"question_id": i, "category": "qa", "turns": [f"Question number {i}?"]}
          for i in range(3)]
  (tmp_path / "specbench_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  raw = edited("specedge", "client.dataset", "specbench")
  raw["client"].update(sample_req_cnt=1, reasoning=True)
  ref = rc.load_reference_yaml(write(tmp_path, raw), dataset_dir=str(tmp_path))
  assert ref.config.workload.reasoning is True
  assert ref.config.server.prefill_cache_entries == 3  # counted in dataset_dir
  ids = {}
  for reasoning in (True, False):
    config = dataclasses.replace(ref.config, workload=dataclasses.replace(
        ref.config.workload, reasoning=reasoning))
    loaded = workload.load_requests(config, thinking)
    ids[reasoning] = [r.prompt_ids for r in loaded]
    for r, row in zip(loaded, rows):
      text = datasets.apply_chat_template(thinking, row["turns"][0], reasoning)
      assert ("<think>" in text) is (not reasoning)
      assert r.prompt_ids == tuple(thinking.encode(text, add_special_tokens=False))
  assert ids[True] != ids[False]


# ------------------------------------------------------------------------------------------------
# Launcher and end to end


@pytest.mark.slow
def test_server_only_launcher_refuses_a_bad_file_by_key(tmp_path):
  path = write(tmp_path, edited("server_only", "client.colour", "red"))
  done = subprocess.run([sys.executable, "-m", "launch.server_only", f"--reference_yaml={path}"],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode != 0
  assert "unknown keys ['client.colour']" in done.stderr + done.stdout


# Heavy (30 s, CI's time budget): the translation is pinned key by key above, the reference
# workload's orders by the workload tests, and the in-process serving path by the serving tests.
@pytest.mark.heavy
@pytest.mark.slow
def test_specedge_example_runs_end_to_end_and_equals_target_only_greedy(tmp_path):
  """The README's specedge example with tiny overrides (2 rows, 8 tokens, greedy, a small tree):
  a verifier and its two clients in this process, each client replaying both rows in its own
  order, then the autoregressive baseline on the union; every output equals target-only."""
  from specedge_jax.serving import runners  # pylint: disable=g-import-not-at-top (loads JAX)

  raw = yaml.safe_load(SPECEDGE_YAML)
  raw["base"].update(dtype="fp32", max_len=256, result_path=str(tmp_path))
  raw["server"].update(temperature=0.0, max_batch_size=2)
  raw["client"].update(dataset="embedded", sample_req_cnt=1, max_request_num=2,
                       max_new_tokens=8, max_n_beams=4, max_beam_len=3, max_branch_width=4,
                       max_budget=8)
  raw["client"]["proactive"].update(max_n_beams=4, max_beam_len=2, max_branch_width=4,
                                    max_budget=4)
  ref = rc.load_reference_yaml(write(tmp_path, raw))
  config, options = rc.to_local(ref)
  assert config.server.prefill_cache_entries == 2 and options["out_dir"] == ref.out_dir

  async def serve_and_draft():
    stop, ready = asyncio.Event(), asyncio.get_running_loop().create_future()
    server = asyncio.create_task(runners.serve_verifier(config, port=0, on_ready=ready.set_result,
                                                        stop=stop))
    port = await asyncio.wait_for(asyncio.shield(ready), 300)
    try:
      return await asyncio.gather(*[runners.run_drafter(config, f"127.0.0.1:{port}",
                                                        client_index=c) for c in range(2)])
    finally:
      stop.set()
      await server

  per_client = asyncio.run(serve_and_draft())
  orders = [[p.index for p in datasets.client_order(
      [datasets.Prompt("embedded", i, "") for i in range(2)], c)] for c in range(2)]
  for client, outputs in enumerate(per_client):
    assert [o.request_id for o in outputs] == [f"c{client}-embedded-{i}" for i in orders[client]]
    assert all(o.finish_reason in ("length", "eos") and o.error == "" for o in outputs)
  spec = {o.request_id: o.tokens for outputs in per_client for o in outputs}
  baseline = {o.request_id: o.tokens for o in runners.run_server_only(config, "autoregressive")}
  assert len(spec) == 4 and spec == baseline
  assert sum(len(t) for t in spec.values()) > 4  # tokens were generated
