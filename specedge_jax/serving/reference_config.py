"""The reference's YAML experiment files (kaist-ina/specedge `config/*.yaml`) read as our config.

The reference runs three experiments, each from one YAML file whose keys its README documents:
'specedge' (`batch_server.sh` + `client_host.sh`), 'server_only' (`server_only.sh`: SpecExec
with the draft and the target both on the server) and 'auto_batch' (`auto_batch.sh`: the target
alone, batched autoregressive decoding). `load_reference_yaml` maps every key those files hold to
a `ServingConfig` plus what is not a config field (the run folder, which baseline to run) in a
`ReferenceConfig`; `to_local` and `to_server_only` give what `launch.local` and
`launch.server_only` need. Keys that have no meaning here (ssh_key, process_name, devices, the
server address, ...) are accepted with one note each (`ReferenceConfig.notes`, also logged), and
so are keys that only another system's script reads; any other key is refused by name.

This module owns that mapping; docs/reference_parity.md is its table. It loads no model and
reads no prompt file, except to count the rows of the set when `cache_prefill` sizes the
prefill cache.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import yaml

from specedge_jax.data import assets
from specedge_jax.data import datasets
from specedge_jax.data import prompts
from specedge_jax.serving.serving_config import BATCHING_MODES, WORKLOAD_SOURCES, ServingConfig

_log = logging.getLogger(__name__)

SYSTEMS = ("specedge", "server_only", "auto_batch")
# The server-only system each file runs (launch.server_only --baseline); specedge runs none.
BASELINE_OF = {"specedge": None, "server_only": "speculative", "auto_batch": "autoregressive"}
SCRIPT_OF = {"specedge": "client_host.py / batch_server.py", "server_only": "server_only.py",
             "auto_batch": "auto_batch.py"}
DTYPES = ("fp16", "bf16", "fp32")  # the reference's util.convert_dtype

_TREE = ("max_n_beams", "max_beam_len", "max_branch_width", "max_budget")

# Every key each system's scripts read, dotted by section (README and example files). `node` is
# one key: its value maps edge host names to lists of {device: ...}, one per client process.
KEYS: dict[str, tuple[str, ...]] = {
    "specedge": (
        "version", "opt",
        "base.result_path", "base.exp_name", "base.dtype", "base.seed", "base.ssh_key",
        "base.max_len",
        "server.process_name", "server.target_model", "server.device", "server.temperature",
        "server.max_batch_size", "server.num_clients", "server.batch_type",
        "server.cache_prefill",
        "client.host", "client.process_name", "client.draft_model", "client.dataset",
        "client.reasoning", "client.sample_req_cnt", "client.req_offset",
        *(f"client.{k}" for k in _TREE),
        "client.proactive.type", *(f"client.proactive.{k}" for k in _TREE),
        "client.max_new_tokens", "client.max_request_num",
        "node"),
    "server_only": (
        "base.result_path", "base.exp_name", "base.dtype", "base.seed", "base.ssh_key",
        "base.max_len",
        "server.process_name", "server.target_model", "server.device", "server.temperature",
        "server.num_clients",
        "client.host", "client.process_name", "client.draft_model", "client.dataset",
        *(f"client.{k}" for k in _TREE),
        "client.max_batch_size", "client.max_new_tokens", "client.max_request_num",
        "client.sample_req_cnt", "client.device"),
    "auto_batch": (
        "base.result_path", "base.exp_name", "base.seed", "base.model", "base.device",
        "base.dtype", "base.temperature", "base.dataset", "base.batch_size", "base.max_len",
        "base.max_new_tokens", "base.max_request_num", "base.sample_req_cnt"),
}

_DEVICE = ("JAX runs on its default device (choose it with CUDA_VISIBLE_DEVICES or "
           "JAX_PLATFORMS); launch.local pins cores with --verifier_cpus / --drafter_cpus")
_PROCESS_NAME = ("it names the reference's log files; here the logs are <out_dir>/verifier.jsonl, "
                 "drafter<i>.jsonl and server_only_*.jsonl")
# Keys accepted without effect, and why.
NO_MEANING: dict[str, str] = {
    "version": "not read by any reference script",
    "opt": ("the reference runs its edge clients under `python -O` (asserts stripped) when >= 1; "
            "every step is compiled by XLA here"),
    "base.ssh_key": ("the reference starts its edge clients over ssh; launch.local runs every "
                     "process on this machine, and a remote edge runs `python -m launch.drafter "
                     "--server=HOST:PORT` itself"),
    "server.process_name": _PROCESS_NAME,
    "client.process_name": _PROCESS_NAME,
    "server.device": _DEVICE,
    "client.device": _DEVICE,
    "base.device": _DEVICE,
    "client.host": ("launch.local serves its verifier on a free loopback port it picks; a remote "
                    "edge gives the address to launch.drafter --server"),
}


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
  """A reference YAML file, read.

  system: 'specedge' | 'server_only' | 'auto_batch'.
  config: the run's ServingConfig.
  out_dir: the reference's result folder, `<base.result_path>/<base.exp_name>`.
  baseline: the server-only system the file runs ('speculative', 'autoregressive'); None for
    specedge.
  notes: one line per key that has no effect here or behaves differently (also logged).
  path: the file.
  """

  system: str
  config: ServingConfig
  out_dir: str
  baseline: str | None
  notes: tuple[str, ...]
  path: str


def infer_system(raw: Mapping[str, Any]) -> str:
  """Which experiment a parsed file configures: auto_batch keeps everything under `base` and names
  one `model`; only specedge has `node` (its edge clients); server_only has server and client."""
  if set(raw) <= {"base"} and isinstance(raw.get("base"), Mapping) and "model" in raw["base"]:
    return "auto_batch"
  if "node" in raw:
    return "specedge"
  if "server" in raw and "client" in raw:
    return "server_only"
  raise ValueError(f"cannot tell which reference system this file configures (sections "
                   f"{sorted(raw)}); give system= one of {SYSTEMS}")


def _flatten(raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat: dict[str, Any] = {}
  for key, value in raw.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and name != "node":
      flat.update(_flatten(value, f"{name}."))
    else:
      flat[name] = value
  return flat


class _Reader:
  """Typed reads of one file's flat keys; collects the notes and the absent keys."""

  def __init__(self, flat: Mapping[str, Any], system: str, path: str):
    self.flat, self.system, self.path = flat, system, path
    self.notes: list[str] = []
    self.absent: list[str] = []

  def has(self, key: str) -> bool:
    return key in self.flat

  def get(self, key: str, kind: type, default: Any = None, required: bool = False) -> Any:
    if key not in self.flat:
      if required:
        raise ValueError(f"{self.path}: `{key}` is required (system {self.system})")
      self.absent.append(key)
      return default
    value = self.flat[key]
    if kind is bool:
      # The reference passes these through the environment and tests `== "True"`.
      if isinstance(value, str) and value in ("True", "False"):
        return value == "True"
      if not isinstance(value, bool):
        raise ValueError(f"{self.path}: `{key}` must be true or false, got {value!r}")
      return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
      return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
      raise ValueError(f"{self.path}: `{key}` must be {kind.__name__}, got {value!r}")
    return value


def _dataset_rows(source: str, dataset_dir: str) -> int | None:
  """Rows of a prompt file, or None if it cannot be read (counted for cache_prefill only)."""
  try:
    if source == "embedded":
      return len(prompts.load_records(assets.DEFAULT_PROMPTS))
    path = os.path.join(dataset_dir or datasets.DEFAULT_DATASET_DIR,
                        datasets.DATASET_FILES[source])
    if source == "specbench":
      with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())
    return len(datasets.read_index_text_rows(path))
  except (OSError, ValueError):
    return None


def load_reference_yaml(path: str | os.PathLike, system: str | None = None, *,
                        dataset_dir: str = "") -> ReferenceConfig:
  """Reads one reference YAML file (system: inferred from its sections when None).

  dataset_dir: where the prompt files are (workload.dataset_dir; the reference reads its own
    `data/`); empty: datasets.DEFAULT_DATASET_DIR.

  Raises:
    ValueError: an unknown key (named, with the known ones), a value of the wrong type, a
      missing model or dataset, or num_clients that disagrees with the node list.
  """
  path = os.fspath(path)
  with open(path, encoding="utf-8") as f:
    raw = yaml.safe_load(f)
  if not isinstance(raw, Mapping):
    raise ValueError(f"{path}: expected a YAML mapping of sections, got {type(raw).__name__}")
  system = system or infer_system(raw)
  if system not in SYSTEMS:
    raise ValueError(f"unknown reference system {system!r}; known: {SYSTEMS}")
  flat = _flatten(raw)
  known = set(KEYS[system])
  others = {key: name for name in SYSTEMS if name != system for key in KEYS[name]}
  unknown = sorted(k for k in flat if k not in known and k not in others)
  if unknown:
    raise ValueError(f"{path}: unknown keys {unknown} for a {system} config; known: "
                     f"{sorted(known)}")
  reader = _Reader(flat, system, path)
  for key in sorted(k for k in flat if k not in known):
    reader.notes.append(f"`{key}` is read only by the reference's {SCRIPT_OF[others[key]]}, "
                        f"not by its {SCRIPT_OF[system]}: ignored")
  for key in sorted(k for k in flat if k in known and k in NO_MEANING):
    reader.notes.append(f"`{key}` ({flat[key]!r}) has no meaning here: {NO_MEANING[key]}")
  result_path = reader.get("base.result_path", str, "result")
  exp_name = reader.get("base.exp_name", str, system)
  mapping = _MAPPERS[system](reader, dataset_dir)
  mapping["name"] = exp_name
  if reader.absent:
    reader.notes.append(f"keys absent from the file, this project's defaults used: "
                        f"{sorted(reader.absent)}")
  config = ServingConfig.from_mapping(mapping)
  for note in reader.notes:
    _log.warning("reference config %s: %s", path, note)
  return ReferenceConfig(system=system, config=config,
                         out_dir=os.path.join(result_path, exp_name),
                         baseline=BASELINE_OF[system], notes=tuple(reader.notes), path=path)


def _common(r: _Reader, dataset_key: str, max_len_key: str, dataset_dir: str) -> dict[str, Any]:
  """The workload, dtype and cache length every system has; returns the config mapping."""
  source = r.get(dataset_key, str, required=True).lower()  # util.load_dataset lowers it
  if source not in WORKLOAD_SOURCES:
    raise ValueError(f"{r.path}: `{dataset_key}` must be one of {WORKLOAD_SOURCES}, got "
                     f"{source!r}")
  dtype = r.get("base.dtype", str, "")
  if dtype and dtype not in DTYPES:
    raise ValueError(f"{r.path}: `base.dtype` must be one of {DTYPES}, got {dtype!r}")
  workload: dict[str, Any] = {"source": source, "dataset_dir": dataset_dir, "num_requests": 0}
  seed = r.get("base.seed", int)
  if seed is not None:
    workload["seed"] = seed
  mapping: dict[str, Any] = {"models": {"dtype": dtype}, "server": {}, "edge": {},
                             "workload": workload, "tree": {}, "proactive": {}}
  max_len = r.get(max_len_key, int)
  if max_len is not None:  # one KV cache length in the reference, for server and edge alike
    mapping["server"]["max_len"] = mapping["edge"]["max_len"] = max_len
  return mapping


def _set_workload(r: _Reader, mapping: dict[str, Any], section: str) -> None:
  """max_new_tokens, sample_req_cnt and max_request_num (an end row) of `section`."""
  workload = mapping["workload"]
  for key, field in (("max_new_tokens", "max_new_tokens"), ("sample_req_cnt", "sample_req_cnt")):
    value = r.get(f"{section}.{key}", int)
    if value is not None:
      workload[field] = value
  end = r.get(f"{section}.max_request_num", int)
  if end is not None:
    offset = workload.get("req_offset", 0)
    if end != -1 and end <= offset:
      raise ValueError(f"{r.path}: `{section}.max_request_num` is the end row of the sampled "
                       f"rows (exclusive): -1 (all rows) or > req_offset={offset}, got {end}")
    workload["end_row"] = end


def _set_tree(r: _Reader, target: dict[str, Any], prefix: str) -> None:
  for key in _TREE:
    value = r.get(f"{prefix}{key}", int)
    if value is not None:
      target[key] = value


def _set_temperature(r: _Reader, mapping: dict[str, Any], key: str) -> None:
  temperature = r.get(key, float)
  if temperature is None:
    return
  mapping["workload"]["temperature"] = temperature
  if temperature > 0:
    r.notes.append(
        f"`{key}` = {temperature}: sampled at that temperature with top_p 1.0. The reference's "
        "verifier calls util.sampler_from_logits with its default top_p=0.8, whose filter "
        "(logits sorted in descending order, tokens with cumulative probability <= 0.2 "
        "dropped) removes the head of the distribution rather than its tail; that is not "
        "reproduced (set --config.workload.top_p for nucleus sampling)")


def _specedge(r: _Reader, dataset_dir: str) -> dict[str, Any]:
  mapping = _common(r, "client.dataset", "base.max_len", dataset_dir)
  mapping["models"]["target"] = r.get("server.target_model", str, required=True)
  mapping["models"]["draft"] = r.get("client.draft_model", str, required=True)
  server, edge, workload = mapping["server"], mapping["edge"], mapping["workload"]
  _set_temperature(r, mapping, "server.temperature")
  batch = r.get("server.max_batch_size", int)
  if batch is not None:
    server["max_batch_size"] = batch
  batch_type = r.get("server.batch_type", str)
  if batch_type is not None:
    if batch_type not in BATCHING_MODES:
      raise ValueError(f"{r.path}: `server.batch_type` must be one of {BATCHING_MODES}, got "
                       f"{batch_type!r}")
    # The reference's dynamic batch takes what is queued without waiting (max_wait_ms 0); its
    # static batch waits for max_batch_size trees with no limit, ours for at most
    # static_timeout_s (and never for sessions that are not open).
    server["batching"] = {"mode": batch_type}
  clients = _node_clients(r)
  num_clients = r.get("server.num_clients", int)
  if num_clients is not None and clients is not None and num_clients != clients:
    raise ValueError(f"{r.path}: `server.num_clients` = {num_clients} but `node` lists {clients} "
                     "client devices; the reference requires them to match (its server waits for "
                     "num_clients clients)")
  num_clients = num_clients if num_clients is not None else clients
  if num_clients is not None:
    if num_clients < 1:
      raise ValueError(f"{r.path}: `server.num_clients` must be >= 1, got {num_clients}")
    edge["num_drafters"] = num_clients
    server["num_slots"] = num_clients  # the reference's KV cache holds one row per client
  # The reference's client: one request at a time, the whole set in its own order.
  edge["requests_per_drafter"] = 1
  workload["mode"] = "reference"
  workload["reasoning"] = r.get("client.reasoning", bool, False)
  offset = r.get("client.req_offset", int)
  if offset is not None:
    workload["req_offset"] = offset
  _set_workload(r, mapping, "client")
  _set_tree(r, mapping["tree"], "client.")
  proactive_type = r.get("client.proactive.type", str)
  if proactive_type is not None:
    mapping["proactive"]["mode"] = proactive_type
  _set_tree(r, mapping["proactive"], "client.proactive.")
  cache_prefill = r.get("server.cache_prefill", bool, False)
  if cache_prefill:
    server["prefill_cache_entries"] = _prefill_entries(r, workload, dataset_dir)
  return mapping


def _node_clients(r: _Reader) -> int | None:
  """The client processes `node` starts (one per device entry), with notes on hosts/devices."""
  if not r.has("node"):
    return None
  nodes = r.flat["node"]
  if not isinstance(nodes, Mapping) or not nodes:
    raise ValueError(f"{r.path}: `node` must map edge host names to lists of {{device: ...}}")
  count = 0
  for host, entries in nodes.items():
    if not isinstance(entries, list) or not entries:
      raise ValueError(f"{r.path}: `node.{host}` must be a list of {{device: ...}} entries")
    for entry in entries:
      if not isinstance(entry, Mapping) or set(entry) - {"device"}:
        raise ValueError(f"{r.path}: `node.{host}` entries take only `device`, got {entry!r}")
    count += len(entries)
  r.notes.append(f"`node` ({dict(nodes)!r}): {count} edge clients, all run on this machine by "
                 f"launch.local; their devices have no meaning here: {_DEVICE}")
  return count


def _prefill_entries(r: _Reader, workload: Mapping[str, Any], dataset_dir: str) -> int:
  """cache_prefill: room for every sampled prompt's prefill snapshot, as the reference keeps."""
  rows = _dataset_rows(workload["source"], dataset_dir)
  how = ("snapshots of each prompt's first prefill, kept in host memory and taken at first use; "
         "the reference precomputes them at start-up and persists them under ~/.cache/specedge "
         "(server.prefill_precompute, being built, is that)")
  if rows is None:
    r.notes.append(f"`server.cache_prefill`: the {workload['source']} prompt file could not be "
                   f"counted, so server.prefill_cache_entries = 64 ({how})")
    return 64
  count = len(datasets.sample_rows(rows, workload.get("req_offset", 0),
                                   workload.get("sample_req_cnt", 1),
                                   workload.get("end_row", -1)))
  r.notes.append(f"`server.cache_prefill`: server.prefill_cache_entries = {count}, one per "
                 f"sampled prompt ({how})")
  return max(count, 1)


def _server_only(r: _Reader, dataset_dir: str) -> dict[str, Any]:
  mapping = _common(r, "client.dataset", "base.max_len", dataset_dir)
  mapping["models"]["target"] = r.get("server.target_model", str, required=True)
  mapping["models"]["draft"] = r.get("client.draft_model", str, required=True)
  _set_temperature(r, mapping, "server.temperature")
  num_clients = r.get("server.num_clients", int)
  if num_clients is not None and num_clients != 1:
    r.notes.append(f"`server.num_clients` = {num_clients}: the reference's server_only.py runs "
                   "one client whatever it says (it sets SPECEDGE_NUM_CLIENTS=1); so does this")
  # One reference client: the set from row 0 (server_only.py forces req_offset 0) in
  # random.seed(0) order, which is reference mode's order for client 0.
  mapping["edge"].update(num_drafters=1, requests_per_drafter=1)
  mapping["workload"]["mode"] = "reference"
  batch = r.get("client.max_batch_size", int)
  if batch is not None:
    mapping["server"]["max_batch_size"] = mapping["server"]["num_slots"] = batch
  _set_workload(r, mapping, "client")
  _set_tree(r, mapping["tree"], "client.")
  return mapping


def _auto_batch(r: _Reader, dataset_dir: str) -> dict[str, Any]:
  mapping = _common(r, "base.dataset", "base.max_len", dataset_dir)
  model = r.get("base.model", str, required=True)
  # The autoregressive baseline loads no draft; the field is required, so it names the target.
  mapping["models"].update(target=model, draft=model)
  temperature = r.get("base.temperature", float)
  if temperature:
    r.notes.append(f"`base.temperature` = {temperature}: the reference's auto_batch.py decodes "
                   "greedily (argmax) whatever it says; so does this (workload.temperature 0)")
  mapping["workload"]["temperature"] = 0.0
  batch = r.get("base.batch_size", int)
  if batch is not None:
    mapping["server"]["max_batch_size"] = mapping["server"]["num_slots"] = batch
  # auto_batch.py serves rows 0, s, 2s, ... of dataset[:max_request_num] in file order.
  mapping["edge"]["num_drafters"] = 1
  _set_workload(r, mapping, "base")
  if mapping["workload"].get("end_row", -1) == -1:
    r.notes.append("`base.max_request_num` = -1: every row here; the reference's auto_batch.py "
                   "slices dataset[:-1], which drops the file's last row (it matters only when "
                   "that row is sampled, i.e. (rows - 1) % sample_req_cnt == 0; set "
                   "--config.workload.end_row to the row count - 1 to match)")
  return mapping


_MAPPERS = {"specedge": _specedge, "server_only": _server_only, "auto_batch": _auto_batch}


def apply_overrides(config: ServingConfig, overrides: Mapping[str, Any]) -> ServingConfig:
  """The config with dotted-path values replaced (`{"workload.max_new_tokens": 8}`): what
  `--config.<path>=value` flags give a launcher (`config_flags.get_override_values`)."""
  if not overrides:
    return config
  mapping = config.to_dict()
  for dotted, value in overrides.items():
    node = mapping
    *parents, leaf = dotted.split(".")
    for part in parents:
      child = node.get(part)
      if not isinstance(child, dict):
        raise ValueError(f"override {dotted!r}: config has no section {part!r}")
      node = child
    node[leaf] = value
  return ServingConfig.from_mapping(mapping)


def to_local(ref: ReferenceConfig, overrides: Mapping[str, Any] | None = None
             ) -> tuple[ServingConfig, dict[str, Any]]:
  """What launch.local needs for a specedge file: the config (with `--config.*` overrides) and
  the `LocalOptions` fields the file sets (its result folder; the launcher's flags win)."""
  if ref.system != "specedge":
    raise ValueError(f"{ref.path} is a {ref.system} config: run it with `python -m "
                     f"launch.server_only --reference_yaml={ref.path}`")
  return apply_overrides(ref.config, overrides or {}), {"out_dir": ref.out_dir}


def to_server_only(ref: ReferenceConfig, baseline: str | None = None,
                   overrides: Mapping[str, Any] | None = None) -> tuple[ServingConfig, str]:
  """What launch.server_only needs: the config and the baseline (the file's, unless given; a
  specedge file runs a given baseline on the same workload, the union of its clients')."""
  kind = baseline or ref.baseline
  if kind is None:
    raise ValueError(f"{ref.path} is a specedge config, which names no server-only system: "
                     "give --baseline=autoregressive or speculative")
  return apply_overrides(ref.config, overrides or {}), kind
