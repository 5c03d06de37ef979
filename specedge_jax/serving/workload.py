"""The requests of a serving run: prompts loaded, tokenized, checked, and dealt to clients.

Every system of a comparison (SpecEdge, the server-only baselines) serves the same token ids,
produced here once per process from the config: the embedded prompt set (`prompts.py`) or a
SpecEdge benchmark set (`datasets.py`). This module never talks to a server or a model.
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
  """All requests of the run, in order, as token ids (tokenizer: the target's, loaded if None)."""
  workload = config.workload
  if tokenizer is None:
    tokenizer = load_tokenizer(config.models.tokenizer_dir)
  if workload.source == "embedded":
    records = prompts.load_records(assets.DEFAULT_PROMPTS)
    requests = [EdgeRequest(request_id=f"embedded-{record.get('id', i)}",
                            prompt_ids=tuple(prompts.encode(tokenizer, record)),
                            dataset="embedded", category=record.get("kind"))
                for i, record in enumerate(records)]
  else:
    dataset_dir = workload.dataset_dir or datasets.DEFAULT_DATASET_DIR
    loaded = datasets.load_prompts(workload.source, dataset_dir, req_offset=workload.req_offset,
                                   sample_req_cnt=workload.sample_req_cnt,
                                   tokenizer=tokenizer if workload.source == "specbench" else None)
    # Spec-Bench text already went through the chat template (which adds any BOS itself); the
    # plain sets are encoded as the reference encodes them, special tokens included.
    add_special = workload.source != "specbench"
    requests = [EdgeRequest(request_id=f"{p.dataset}-{p.index}",
                            prompt_ids=tuple(int(t) for t in tokenizer.encode(
                                p.text, add_special_tokens=add_special)),
                            dataset=p.dataset, category=p.category)
                for p in loaded]
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


def with_prefix(requests: Sequence[EdgeRequest], prefix: str) -> list[EdgeRequest]:
  """Request ids made unique across runs that share an event log."""
  return [dataclasses.replace(r, request_id=f"{prefix}{r.request_id}") for r in requests]
