"""The serving experiment config: one frozen dataclass, read from `configs/*.py`.

Config files follow ml_collections' `get_config()` convention and return a `ConfigDict`, so that
launchers get command-line overrides for free (`--config=configs/embedded.py
--config.tree.max_budget=16`). `ServingConfig.from_mapping` turns that dict into frozen
dataclasses and refuses unknown or missing keys by name. This module owns the field names and
their checks; it never loads a model or opens a socket.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from specedge_jax.api import ProactiveParams, SamplingParams, TreeParams
from specedge_jax.mesh_shape import parse_mesh_shape

WORKLOAD_SOURCES = ("embedded", "c4", "mtbench", "oasst", "wikitext", "specbench")
BATCHING_MODES = ("static", "dynamic", "slo")
# How a run deals its requests to the drafters (`WorkloadConfig.mode`).
WORKLOAD_MODES = ("sharded", "reference")


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
  """How the engine thread groups verify requests into one forward.

  mode: 'dynamic' takes what is queued after at most `max_wait_ms`; 'static' waits for a full
    batch (`max_batch_size`, or every active session) but at most `static_timeout_s`; 'slo'
    forms batches by the sessions' inter-token-latency SLOs and the verify-time estimate, and
    may cut trees to fit (`slo_scheduler.py`).
  default_itl_slo_ms: 'slo': the ITL SLO of a session whose open carries none (0: no SLO; such
    a session's rounds are due after `max_queue_ms`).
  max_queue_ms: 'slo': the starvation bound. A verify that waited this long goes into the next
    batch first, whatever its deadline and value, and no batch holds its oldest verify longer.
  slo_margin_ms: 'slo': time kept back from every deadline for the estimate's error and the
    host's work around the forward.
  """

  mode: str = "dynamic"
  max_wait_ms: float = 0.0
  static_timeout_s: float = 5.0
  default_itl_slo_ms: float = 0.0
  max_queue_ms: float = 100.0
  slo_margin_ms: float = 1.0

  def __post_init__(self):
    if self.mode not in BATCHING_MODES:
      raise ValueError(f"batching mode must be one of {BATCHING_MODES}, got {self.mode!r}")
    if not self.max_wait_ms >= 0:
      raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
    if not self.static_timeout_s > 0:
      raise ValueError(f"static_timeout_s must be > 0, got {self.static_timeout_s}")
    if not (self.default_itl_slo_ms >= 0 and self.max_queue_ms > 0 and self.slo_margin_ms >= 0):
      raise ValueError("default_itl_slo_ms and slo_margin_ms must be >= 0 and max_queue_ms > 0, "
                       f"got {self.default_itl_slo_ms}, {self.slo_margin_ms}, "
                       f"{self.max_queue_ms}")

  def deadline_s(self) -> float:
    """The longest a batch holds its oldest request ('slo' decides earlier, by deadlines)."""
    if self.mode == "static":
      return self.static_timeout_s
    return self.max_queue_ms / 1000.0 if self.mode == "slo" else self.max_wait_ms / 1000.0



@dataclasses.dataclass(frozen=True)
class ModelsConfig:
  """Checkpoints: HF folders or orbax checkpoint dirs (see `orbax_io.load_model`).

  drafts: heterogeneous edges. Drafter i runs `drafts[i % len(drafts)]` (`draft_for`), so a list
    of two alternates the models over any number of drafters; empty: every drafter runs `draft`.
    Each must share the target's tokenizer (the verifier refuses the others at open). `draft`
    stays the server-only speculative baseline's draft and the default.
  """

  target: str
  draft: str
  tokenizer: str = ""  # folder with the tokenizer; empty: the target folder
  dtype: str = ""  # parameter dtype: 'fp32', 'bf16', 'fp16'; empty: as stored
  drafts: tuple[str, ...] = ()

  def __post_init__(self):
    if isinstance(self.drafts, str):  # a lone folder would be taken as a list of characters
      raise ValueError(f"models.drafts must be a list of folders, got {self.drafts!r}")
    drafts = tuple(self.drafts)  # JSON and ConfigDict give lists
    if not all(isinstance(d, str) and d for d in drafts):
      raise ValueError(f"models.drafts must be non-empty folder names, got {list(drafts)}")
    object.__setattr__(self, "drafts", drafts)

  @property
  def tokenizer_dir(self) -> str:
    return self.tokenizer or self.target

  def draft_for(self, client_index: int) -> str:
    """The draft model folder drafter `client_index` runs."""
    return self.drafts[client_index % len(self.drafts)] if self.drafts else self.draft


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  """The verifier: KV slots, batching, cache length."""

  num_slots: int = 8  # concurrent sessions (KV slots)
  max_batch_size: int = 8  # trees per verify forward
  max_len: int = 1024  # cache rows per slot: prompt + generated tokens + one tree
  prefill_chunk: int = 64
  prefill_cache_entries: int = 0  # >0: snapshot prompt prefills for replayed prompts
  # At start-up, every workload prompt's prefill is loaded from the on-disk store or computed and
  # saved there (serving/prefill_store.py), and the snapshot cache is sized to hold them all.
  prefill_precompute: bool = False
  prefill_store_dir: str = ""  # the store's folder; empty: prefill_store.default_store_dir()
  # A session's lease: a session with no call for this long is closed and its slot freed.
  session_timeout_s: float = 30.0
  max_sessions_per_client: int = 0  # sessions one client may hold; 0: no cap beyond the slots
  drain_s: float = 10.0  # on SIGTERM: how long open sessions may still be served
  # Opens beyond the slots wait first come first served in a queue this long, for at most
  # admission_wait_s (fair: no client gets ahead by retrying faster); 0 refuses them at once.
  admission_queue: int = 16
  admission_wait_s: float = 10.0
  batching: BatchingConfig = BatchingConfig()
  # Live-prefix attention: verify and prefill read the smallest power-of-two bucket of rows
  # (from this one up to max_len) that holds the batch's longest prefix plus its tree; each
  # bucket is one more compiled program per batch size. >= max_len attends over every row.
  attention_min_rows: int = 128
  # Tree sizes (nodes, root included) below the largest that verify also compiles for: a batch
  # of small or truncated trees ('slo' batching, the speculation controller) then runs a
  # smaller forward. Empty: every tree is padded to the largest (one program per batch size).
  tree_buckets: tuple[int, ...] = ()
  # The speculation controller (serving/speculation_controller.py): every answer advises the
  # session's next tree (budget, depth) from its acceptance by depth, RTT, draft speed and the
  # server's load; edges follow it within their configured tree. `control_reach_threshold`:
  # draft to the deepest depth reached with at least this probability.
  speculation_control: bool = False
  control_reach_threshold: float = 0.3
  # SLO-aware admission (serving/slo_admission.py): hold fewer sessions than slots while the
  # ITL the verifier measures misses the sessions' SLOs (AIMD); opens past it queue as for full
  # slots (admission_queue, admission_wait_s), so the wait is time to first token. Sessions
  # without an SLO do not count.
  slo_admission: bool = False
  # The target's devices: 'model=N' shards weights and cache over N devices (tensor
  # parallelism), 'data=D,model=N' also splits the slots over D groups; '' is one device.
  mesh_shape: str = ""
  # The memory planner's device size in GiB (0: what the device reports; on CPU the host's
  # memory over the devices) and the fraction of it the verifier may plan to use.
  device_memory_gb: float = 0.0
  memory_headroom: float = 0.9
  # The verify-time estimator (serving/verify_time.py), which batching mode 'slo' plans with and
  # every mode feeds with its measured batches: the JSON file its measurements persist in across
  # restarts ('': in memory only), and the `launch.bench_core --out_json` verify curve it starts
  # from ('': the built-in CPU defaults).
  verify_time_path: str = ""
  verify_time_seed: str = ""

  def __post_init__(self):
    for name in ("num_slots", "max_batch_size", "max_len", "prefill_chunk"):
      if getattr(self, name) < 1:
        raise ValueError(f"server.{name} must be >= 1, got {getattr(self, name)}")
    if self.prefill_cache_entries < 0:
      raise ValueError("server.prefill_cache_entries must be >= 0")
    if self.prefill_store_dir and not self.prefill_precompute:
      raise ValueError("server.prefill_store_dir is set but server.prefill_precompute is off")
    if not self.session_timeout_s > 0:
      raise ValueError(f"server.session_timeout_s must be > 0, got {self.session_timeout_s}")
    if self.max_sessions_per_client < 0:
      raise ValueError("server.max_sessions_per_client must be >= 0")
    if self.admission_queue < 0 or not self.admission_wait_s > 0:
      raise ValueError("server.admission_queue must be >= 0 and admission_wait_s > 0")
    if not self.drain_s >= 0:
      raise ValueError(f"server.drain_s must be >= 0, got {self.drain_s}")
    if isinstance(self.tree_buckets, (str, int)) or not all(
        isinstance(b, int) and b >= 1 for b in self.tree_buckets):
      raise ValueError(f"server.tree_buckets must be a list of sizes >= 1, got "
                       f"{self.tree_buckets!r}")
    object.__setattr__(self, "tree_buckets", tuple(self.tree_buckets))  # JSON gives a list
    if not 0 < self.control_reach_threshold < 1:
      raise ValueError(f"server.control_reach_threshold must be in (0, 1), got "
                       f"{self.control_reach_threshold}")
    if self.attention_min_rows < 1:
      raise ValueError(f"server.attention_min_rows must be >= 1, got {self.attention_min_rows}")
    mesh = parse_mesh_shape(self.mesh_shape)  # a malformed shape fails here, by name
    if self.num_slots % mesh["data"]:
      raise ValueError(f"server.num_slots {self.num_slots} is not a multiple of the mesh's data "
                       f"axis {mesh['data']}")
    if not self.device_memory_gb >= 0 or not 0 < self.memory_headroom <= 1:
      raise ValueError("server.device_memory_gb must be >= 0 and memory_headroom in (0, 1]")


@dataclasses.dataclass(frozen=True)
class EdgeConfig:
  """The drafters: how many, requests interleaved on each, simulated network."""

  num_drafters: int = 2
  requests_per_drafter: int = 2  # K, interleaved on one edge
  interleave: bool = True
  simulated_rtt_ms: float = 0.0
  max_len: int = 1024  # committed rows of the draft cache
  # The edge's side of faults: the deadline of one RPC, how often a Verify whose reply was lost
  # is sent again (same step: idempotent), and how long to try to resume requests after the
  # verifier went away before failing them.
  rpc_timeout_s: float = 120.0
  verify_retries: int = 3
  reconnect_give_up_s: float = 60.0
  # The HTTP API (launch/drafter.py --http_port): requests beyond the K running wait in a queue
  # this long (first come first served); past it they get 429. An open that finds no verifier
  # gives up after open_give_up_s (the HTTP API then answers 503).
  max_queued_requests: int = 8
  open_give_up_s: float = 300.0
  # The reference's speculative first round: the edge drafts on the prompt and the server
  # prefills prompt[:-1] and verifies that tree in the open (drafter.py).
  speculative_first_round: bool = False
  # The inter-token-latency SLO each of this edge's sessions asks for, in ms (0: none; the
  # verifier then applies its server.batching.default_itl_slo_ms). Only batching mode 'slo'
  # reads it.
  itl_slo_ms: int = 0

  def __post_init__(self):
    if self.itl_slo_ms < 0:
      raise ValueError(f"edge.itl_slo_ms must be >= 0, got {self.itl_slo_ms}")
    if self.max_queued_requests < 0 or not self.open_give_up_s > 0:
      raise ValueError("edge.max_queued_requests must be >= 0 and edge.open_give_up_s > 0")
    if not (self.rpc_timeout_s > 0 and self.reconnect_give_up_s >= 0 and self.verify_retries >= 0):
      raise ValueError("edge.rpc_timeout_s must be > 0, edge.reconnect_give_up_s and "
                       "edge.verify_retries >= 0")
    if self.num_drafters < 1 or self.requests_per_drafter < 1:
      raise ValueError("edge.num_drafters and edge.requests_per_drafter must be >= 1")
    if not self.simulated_rtt_ms >= 0:
      raise ValueError(f"edge.simulated_rtt_ms must be >= 0, got {self.simulated_rtt_ms}")


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
  """The requests: the embedded prompt set or a SpecEdge benchmark set (`datasets.py`).

  The sampled set is the reference client's: rows `[req_offset, end_row)` of the prompt file,
  every `sample_req_cnt`-th (`datasets.sample_rows`), then at most `num_requests` of them.

  mode: 'sharded' deals the set round-robin to the drafters, K interleaved requests on each
    (`workload.shard`). 'reference' is the reference's client: every drafter runs one request at
    a time (edge.requests_per_drafter must be 1) and replays the whole set in its own order,
    `datasets.client_order` with its client index; request ids get a `c<client>-` prefix.
  end_row: the reference's `max_request_num`: the exclusive end row of the sampled rows in the
    prompt file (not a count); -1: the end of the file.
  reasoning: the reference's `reasoning`: `enable_thinking` of chat templates that read it
    (Qwen3) when Spec-Bench turns are wrapped (`datasets.apply_chat_template`).
  """

  source: str = "embedded"
  dataset_dir: str = ""  # for the benchmark sets; empty: datasets.DEFAULT_DATASET_DIR
  num_requests: int = 8  # the first of the sampled set (0: all), dealt out or replayed by each
  req_offset: int = 0
  sample_req_cnt: int = 1
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0
  mode: str = "sharded"
  end_row: int = -1
  reasoning: bool = False

  def __post_init__(self):
    if self.source not in WORKLOAD_SOURCES:
      raise ValueError(f"workload.source must be one of {WORKLOAD_SOURCES}, got "
                       f"{self.source!r}")
    if self.mode not in WORKLOAD_MODES:
      raise ValueError(f"workload.mode must be one of {WORKLOAD_MODES}, got {self.mode!r}")
    if self.num_requests < 0 or self.max_new_tokens < 1:
      raise ValueError("workload.num_requests must be >= 0 and max_new_tokens >= 1")
    if self.req_offset < 0 or self.sample_req_cnt < 1:
      raise ValueError(f"workload.req_offset must be >= 0 and sample_req_cnt >= 1, got "
                       f"{self.req_offset} and {self.sample_req_cnt}")
    # An end at or before the offset samples nothing: refused here rather than as an empty run.
    if self.end_row != -1 and self.end_row <= self.req_offset:
      raise ValueError(f"workload.end_row is an exclusive end row (the reference's "
                       f"max_request_num): -1 (the end of the file) or > req_offset="
                       f"{self.req_offset}, got {self.end_row}")
    if not isinstance(self.reasoning, bool):
      raise ValueError(f"workload.reasoning must be true or false, got {self.reasoning!r}")
    self.sampling  # validates temperature / top_p / top_k  # pylint: disable=pointless-statement

  @property
  def sampling(self) -> SamplingParams:
    return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

  def client_share(self, total: int, client_index: int, num_clients: int) -> int:
    """How many requests drafter `client_index` serves when the sampled set holds `total`."""
    if self.mode == "reference":
      return total  # every client replays the whole set
    return len(range(client_index, total, num_clients))

  def server_only_total(self, total: int, num_clients: int) -> int:
    """How many requests a server-only baseline serves: the union of the drafters' requests."""
    return total * num_clients if self.mode == "reference" else total


@dataclasses.dataclass(frozen=True)
class ServingConfig:
  name: str
  models: ModelsConfig
  tree: TreeParams = TreeParams()
  proactive: ProactiveParams = ProactiveParams()
  server: ServerConfig = ServerConfig()
  edge: EdgeConfig = EdgeConfig()
  workload: WorkloadConfig = WorkloadConfig()

  def __post_init__(self):
    # Refused rather than forced: a silently changed K would change the run's batching and
    # throughput behind the user's back.
    if self.workload.mode == "reference" and self.edge.requests_per_drafter != 1:
      raise ValueError(
          "workload.mode='reference' runs one request at a time on each drafter, as the "
          "reference's client does: set edge.requests_per_drafter=1 (got "
          f"{self.edge.requests_per_drafter})")

  @property
  def max_tree_nodes(self) -> int:
    """Nodes of the largest tree an edge sends, root included."""
    return self.tree.max_budget + 1

  @classmethod
  def from_mapping(cls, mapping: Mapping[str, Any]) -> "ServingConfig":
    """Builds the config from nested dicts (a ConfigDict's `to_dict()`, or JSON)."""
    return _build(cls, _plain(mapping), "config")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def save_json(self, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
      json.dump(self.to_dict(), f, indent=2)

  @classmethod
  def load_json(cls, path: str | os.PathLike) -> "ServingConfig":
    with open(path) as f:
      return cls.from_mapping(json.load(f))


def _plain(value):
  if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  return value


def _build(cls, mapping: Mapping[str, Any], where: str):
  if not isinstance(mapping, Mapping):
    raise ValueError(f"{where} must be a mapping, got {type(mapping).__name__}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(mapping) - set(fields))
  if unknown:
    raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(fields)}")
  kwargs = {}
  for name, value in mapping.items():
    field_type = fields[name].type
    nested = _NESTED.get(field_type) if isinstance(field_type, str) else None
    kwargs[name] = _build(nested, value, f"{where}.{name}") if nested else value
  try:
    return cls(**kwargs)
  except TypeError as e:  # a required key is missing
    raise ValueError(f"{where}: {e}") from e


# Field annotations are strings (from __future__ import annotations); map them to classes.
_NESTED = {
    "ModelsConfig": ModelsConfig, "TreeParams": TreeParams, "ProactiveParams": ProactiveParams,
    "ServerConfig": ServerConfig, "EdgeConfig": EdgeConfig, "WorkloadConfig": WorkloadConfig,
    "BatchingConfig": BatchingConfig,
}
