"""The requests of a serving run: prompts loaded, tokenized, checked, and dealt to clients.

Every system of a comparison (SpecEdge, the server-only baselines) serves the same token ids,
produced here once per process from the config: the embedded prompt set (`prompts.py`) or a
SpecEdge benchmark set (`datasets.py`), sampled as the reference client samples
(`datasets.sample_rows`: rows [req_offset, end_row), every sample_req_cnt-th).

Two ways to deal the set (`WorkloadConfig.mode`; `requests_for_client` is the entry point):
'sharded' deals it round-robin to the drafters, which interleave K requests each; 'reference'
gives every drafter the whole set in the reference client's order for its index
(`datasets.client_order`), one request at a time, with ids prefixed `c<client>-` so that they stay
unique in a run. A server-only baseline serves the union of what the drafters serve
(`server_only_requests`): in reference mode every client's copy, taken client by client in
rounds (each client's i-th request, then its i+1-th), the order in which N concurrent clients
submit them; with one client that is exactly the reference's server_only.py order
(`random.seed(0)` shuffle). This module never talks to a server or a model.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from specedge_jax.data import assets
from specedge_jax.data import datasets
from specedge_jax.data import prompts
from specedge_jax.data.tokenizers import load_tokenizer  # runners call workload.load_tokenizer
from specedge_jax.serving.serving_config import ServingConfig
from specedge_jax.serving.drafter import EdgeRequest


def load_requests(config: ServingConfig, tokenizer=None) -> list[EdgeRequest]:
  """The run's sampled set in file order, as token ids (tokenizer: the target's, loaded if None).

  Sharded mode serves exactly these; reference mode gives each drafter all of them, reordered
  (`requests_for_client`). `workload.reasoning` reaches the Spec-Bench chat template, the only
  set the reference wraps in one.
  """
  workload = config.workload
  if tokenizer is None:
    tokenizer = load_tokenizer(config.models.tokenizer_dir)
  if workload.source == "embedded":
    records = prompts.load_records(assets.DEFAULT_PROMPTS)
    # The embedded set is sampled like a benchmark file (the defaults keep every record).
    rows = datasets.sample_rows(len(records), workload.req_offset, workload.sample_req_cnt,
                                workload.end_row)
    requests = [EdgeRequest(request_id=f"embedded-{records[i].get('id', i)}",
                            prompt_ids=tuple(prompts.encode(tokenizer, records[i])),
                            dataset="embedded", category=records[i].get("kind"))
                for i in rows]
  else:
    dataset_dir = workload.dataset_dir or datasets.DEFAULT_DATASET_DIR
    loaded = datasets.load_prompts(workload.source, dataset_dir, req_offset=workload.req_offset,
                                   sample_req_cnt=workload.sample_req_cnt,
                                   max_request_num=workload.end_row,
                                   tokenizer=tokenizer if workload.source == "specbench" else None,
                                   reasoning=workload.reasoning)
    # Spec-Bench text already went through the chat template (which adds any BOS itself); the
    # plain sets are encoded as the reference encodes them, special tokens included.
    add_special = workload.source != "specbench"
    requests = [EdgeRequest(request_id=f"{p.dataset}-{p.index}",
                            prompt_ids=tuple(int(t) for t in tokenizer.encode(
                                p.text, add_special_tokens=add_special)),
                            dataset=p.dataset, category=p.category)
                for p in loaded]
  if not requests:
    raise ValueError(f"the {workload.source} set gives no requests with req_offset="
                     f"{workload.req_offset}, end_row={workload.end_row}")
  if workload.num_requests:
    if workload.num_requests > len(requests):
      raise ValueError(f"workload.num_requests={workload.num_requests} but the "
                       f"{workload.source} set has only {len(requests)} prompts")
    requests = requests[:workload.num_requests]
  # Request i of the run samples with seed + i on every system and whichever client serves it.
  requests = [dataclasses.replace(r, seed=workload.seed + i) for i, r in enumerate(requests)]
  empty = [r.request_id for r in requests if not r.prompt_ids]
  if empty:
    raise ValueError(f"prompts that tokenize to nothing: {empty[:5]}")
  check_fits(requests, config)
  return requests


def check_fits(requests: Sequence[EdgeRequest], config: ServingConfig) -> None:
  """Raises ValueError naming the requests whose prompt does not fit the caches."""
  room = min(config.server.max_len - config.max_tree_nodes, config.edge.max_len - 1)
  limit = room - config.workload.max_new_tokens
  too_long = [(r.request_id, len(r.prompt_ids)) for r in requests if len(r.prompt_ids) > limit]
  if too_long:
    raise ValueError(
        f"{len(too_long)} prompts are longer than {limit} tokens, the most that fits "
        f"server.max_len={config.server.max_len} / edge.max_len={config.edge.max_len} with "
        f"max_new_tokens={config.workload.max_new_tokens} and a {config.max_tree_nodes}-node "
        f"tree (first: {too_long[0][0]}, {too_long[0][1]} tokens); raise the max_len values")


def shard(requests: Sequence[EdgeRequest], client_index: int,
          num_clients: int) -> list[EdgeRequest]:
  """The requests of one client: round-robin, so every client gets a similar mix."""
  if not 0 <= client_index < num_clients:
    raise ValueError(f"client_index {client_index} is not in [0, {num_clients})")
  return list(requests[client_index::num_clients])


def reference_order(requests: Sequence[EdgeRequest], client_index: int,
                    seed: int = 0) -> list[EdgeRequest]:
  """One reference client's requests: the whole set in its shuffled order, ids `c<client>-...`.

  The order is `datasets.client_order`'s (the reference's `random.seed(client_idx);
  random.shuffle(req_indices)`), applied to the positions of the set: a shuffle's permutation
  depends only on the list's length. Request at position p of the set samples with seed
  `seed + client_index * len(requests) + p`, distinct over clients and positions.
  """
  if client_index < 0:
    raise ValueError(f"client_index must be >= 0, got {client_index}")
  positions = [datasets.Prompt("", p, "") for p in range(len(requests))]
  order = [p.index for p in datasets.client_order(positions, client_index)]
  return [dataclasses.replace(requests[p], request_id=f"c{client_index}-{requests[p].request_id}",
                              seed=seed + client_index * len(requests) + p) for p in order]


def requests_for_client(config: ServingConfig, client_index: int,
                        requests: Sequence[EdgeRequest] | None = None) -> list[EdgeRequest]:
  """What drafter `client_index` of `edge.num_drafters` serves, in order, by workload.mode.

  requests: the run's set (`load_requests(config)`, loaded if None).
  """
  num_clients = config.edge.num_drafters
  if not 0 <= client_index < num_clients:
    raise ValueError(f"client_index {client_index} is not in [0, {num_clients})")
  if requests is None:
    requests = load_requests(config)
  if config.workload.mode == "sharded":
    return shard(requests, client_index, num_clients)
  return reference_order(requests, client_index, config.workload.seed)


def server_only_requests(config: ServingConfig,
                         requests: Sequence[EdgeRequest] | None = None) -> list[EdgeRequest]:
  """What a server-only baseline serves: the union of the drafters' requests (module docstring).

  Sharded: the set itself, in order. Reference: every client's copy, in rounds.
  """
  if requests is None:
    requests = load_requests(config)
  if config.workload.mode == "sharded":
    return list(requests)
  per_client = [reference_order(requests, c, config.workload.seed)
                for c in range(config.edge.num_drafters)]
  return [r for round_ in zip(*per_client) for r in round_]


def with_prefix(requests: Sequence[EdgeRequest], prefix: str) -> list[EdgeRequest]:
  """Request ids made unique across runs that share an event log."""
  return [dataclasses.replace(r, request_id=f"{prefix}{r.request_id}") for r in requests]
