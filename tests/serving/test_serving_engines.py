"""Invariant 2 over gRPC: the real verifier and drafters, with the real engines on a tiny pair,
emit exactly the target's greedy tokens, for K=2 interleaved requests per edge, with proactive
drafting on and off, static and dynamic batching. Also the prefill cache.

Proactive mode 'included' differs from 'excluded' only inside the draft engine (how many growth
steps a re-rooted tree still gets); tests/engine/test_speculative.py covers it in process.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from specedge_jax import engine as E
from specedge_jax.api import SamplingParams
from specedge_jax.engine import prefix_cache
from specedge_jax.measure import metrics
from specedge_jax.measure.events import EventLog
from specedge_jax.serving import baselines
from specedge_jax.serving.drafter import Drafter, DrafterConfig, EdgeRequest
from specedge_jax.serving.serving_config import BatchingConfig
from specedge_jax.serving.verifier import VerifierServer
from specedge_jax.testing import tiny_models

VOCAB = 64
MAX_NEW = 16
MAX_LEN = 96
TREE = E.TreeParams(max_n_beams=4, max_beam_len=3, max_branch_width=4, max_budget=12)
NUM_EDGES, REQUESTS_PER_EDGE = 2, 3


@pytest.fixture(scope="module")
def pair():
  # A close draft (small noise) so that deep paths get accepted (about 2.6 tokens per step).
  return tiny_models.make_pair(VOCAB, noise=0.005)


@pytest.fixture(scope="module")
def workload(pair):
  target, _ = pair
  prompts = tiny_models.prompts(NUM_EDGES * REQUESTS_PER_EDGE, VOCAB, seed=3)
  engine = E.TargetEngine(target, num_slots=4, max_len=MAX_LEN,
                          max_tree_nodes=TREE.max_budget + 1, max_batch_size=4)
  reference = E.generate(engine, prompts, max_new_tokens=MAX_NEW).tokens
  return prompts, reference


def edge_requests(prompts, edge):
  return [EdgeRequest(request_id=f"e{edge}r{i}", prompt_ids=tuple(prompts[i]))
          for i in range(edge * REQUESTS_PER_EDGE, (edge + 1) * REQUESTS_PER_EDGE)]


async def serve_edges(target_engine, make_draft_engine, prompts, *, batching, proactive,
                      event_log=None, speculative_first_round=False, **server_kwargs):
  server = VerifierServer(target_engine, batching=batching, event_log=event_log,
                          **server_kwargs)
  port = await server.start("127.0.0.1:0")
  try:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
      drafters = [Drafter(make_draft_engine(), channel,
                          DrafterConfig(client_id=f"edge{e}", max_concurrent_requests=2,
                                        proactive=proactive, max_new_tokens=MAX_NEW,
                                        speculative_first_round=speculative_first_round),
                          event_log=event_log)
                  for e in range(NUM_EDGES)]
      per_edge = await asyncio.gather(*(d.run(edge_requests(prompts, e))
                                        for e, d in enumerate(drafters)))
  finally:
    await server.stop()
  return [output for outputs in per_edge for output in outputs], server


@pytest.mark.slow
@pytest.mark.parametrize("batching,proactive_mode,first_round", [
    ("dynamic", "disabled", "plain"),
    ("static", "excluded", "plain"),
    ("dynamic", "excluded", "speculative"),  # the reference's first round: tree in the open
])
def test_greedy_over_grpc_equals_target_greedy(pair, workload, batching, proactive_mode,
                                               first_round):
  target, draft = pair
  prompts, reference = workload
  target_engine = E.TargetEngine(target, num_slots=4, max_len=MAX_LEN,
                                 max_tree_nodes=TREE.max_budget + 1, max_batch_size=4)
  proactive = E.ProactiveParams(mode=proactive_mode, max_n_beams=4, max_beam_len=2,
                                max_branch_width=4, max_budget=6)
  make_draft = lambda: E.DraftEngine(draft, num_slots=2, max_len=MAX_LEN, tree=TREE,
                                     proactive=proactive)
  log = EventLog(None, "specedge")
  outputs, server = asyncio.run(serve_edges(
      target_engine, make_draft, prompts, batching=BatchingConfig(mode=batching, max_wait_ms=1),
      proactive=proactive.enabled, event_log=log,
      speculative_first_round=first_round == "speculative"))
  assert [o.error for o in outputs] == [""] * len(outputs)
  assert [o.tokens for o in outputs] == reference
  phases = {e["phase"] for e in log.events if e["kind"] == "request_step"}
  firsts = [e for e in log.events if e["kind"] == "request_step" and e.get("first_round")]
  if first_round == "speculative":  # every request's first tokens came from a verified tree
    assert "prefill" not in phases and len(firsts) == len(outputs)
    assert sum(e["accepted_depth"] for e in firsts) > 0, "no first tree was accepted at all"
  else:
    assert "prefill" in phases and not firsts
  assert target_engine.num_free_slots == 4
  assert max(d for o in outputs for d in o.accepted_depths) >= 2, "no deep path was accepted"
  steps = [e for e in log.events if e["kind"] == "request_step" and e["phase"] == "verify"]
  if proactive.enabled:
    # Whether a guess hits is up to the models (the engine tests pin that hits happen and are
    # exact); here: proactive trees were grown during waits, and every step reports a hit flag.
    assert any(e["op"] == "proactive" for e in log.events if e["kind"] == "edge_busy")
    assert all(e["proactive_hit"] is not None for e in steps)
  else:
    assert all(e["proactive_hit"] is None for e in steps)
  _, (summary,) = metrics.summarize_events(log.events)
  assert summary.generated_tokens == sum(len(r) for r in reference)
  assert server.worker.batches_run == len([e for e in log.events if e["kind"] == "server_batch"
                                           and e["op"] == "verify"])


@pytest.mark.slow
def test_prefill_cache_restores_repeated_prompts_exactly(pair, workload):
  """A replayed prompt is restored from its snapshot (no prompt forward) and the session
  continues exactly as a prefilled one: greedy equals the reference, and sampling equals the
  in-process loop with the same seeds and draft."""
  target, draft = pair
  prompts, reference = workload
  target_engine = E.TargetEngine(
      target, num_slots=4, max_len=MAX_LEN, max_tree_nodes=TREE.max_budget + 1,
      max_batch_size=4)
  make_draft = lambda slots=2: E.DraftEngine(draft, num_slots=slots, max_len=MAX_LEN, tree=TREE)
  sampled = SamplingParams(temperature=0.8)
  log = EventLog(None, "specedge")

  async def replay():
    server = VerifierServer(target_engine, prefill_cache_entries=16, event_log=log)
    port = await server.start("127.0.0.1:0")
    results = []
    try:
      async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        for sampling in (SamplingParams(), SamplingParams(), sampled):
          drafter = Drafter(make_draft(), channel,
                            DrafterConfig(max_concurrent_requests=2, max_new_tokens=MAX_NEW,
                                          sampling=sampling, seed=11))
          results.append(await drafter.run(edge_requests(prompts, 0)))
    finally:
      await server.stop()
    return results, server.prefill_cache

  (first, second, third), cache = asyncio.run(replay())
  assert [o.tokens for o in first] == reference[:REQUESTS_PER_EDGE]
  assert [o.tokens for o in second] == reference[:REQUESTS_PER_EDGE]
  plain = E.TargetEngine(target, num_slots=4, max_len=MAX_LEN, max_tree_nodes=TREE.max_budget + 1,
                         max_batch_size=4)
  in_process = E.generate(plain, prompts[:REQUESTS_PER_EDGE], draft=make_draft(4),
                          sampling=sampled, max_new_tokens=MAX_NEW, seed=11)
  assert [o.tokens for o in third] == in_process.tokens
  assert (cache.misses, cache.hits) == (REQUESTS_PER_EDGE, 2 * REQUESTS_PER_EDGE)
  prefills = [e for e in log.events if e["kind"] == "server_batch" and e["op"] == "prefill"]
  assert [e["prefill_cache_hit"] for e in prefills] == [False] * 3 + [True] * 6


def test_a_failed_restore_gives_its_slot_back_and_rejects_a_foreign_snapshot(pair, workload):
  """Opening through the engine's extension point: when filling the rows fails, the slot
  returns to the free list and the next open still works; a snapshot of another prompt, or a
  budget that does not fit, is refused before any slot is taken."""
  target, _ = pair
  prompts, reference = workload
  engine = E.TargetEngine(
      target, num_slots=1, max_len=MAX_LEN, max_tree_nodes=TREE.max_budget + 1,
      max_batch_size=1)
  slot, first, _ = engine.open(prompts[0], SamplingParams(), 0, MAX_NEW)
  assert first == reference[0][0]
  snapshot = engine.export_prefill(slot)
  engine.close(slot)
  with pytest.raises(ValueError, match="different prompt"):
    engine.open_from_prefill(snapshot, prompts[1], SamplingParams(), 0, MAX_NEW)
  with pytest.raises(ValueError, match="cache rows"):
    engine.open_from_prefill(snapshot, prompts[0], SamplingParams(), 0, MAX_LEN)
  broken = prefix_cache.PrefillSnapshot(prompt_ids=snapshot.prompt_ids, k=snapshot.k[:, :, :1],
                                         v=snapshot.v)  # one kv head: must not broadcast
  with pytest.raises(ValueError, match="snapshot k rows have shape"):
    engine.open_from_prefill(broken, prompts[0], SamplingParams(), 0, MAX_NEW)
  assert engine.num_free_slots == 1

  def failing_fill(cache, slot):
    raise RuntimeError("device lost")

  with pytest.raises(RuntimeError, match="device lost"):
    engine._open_slot(engine._checked_prompt(prompts[0], MAX_NEW), SamplingParams(), 0, MAX_NEW,
                      fill=failing_fill)
  assert engine.num_free_slots == 1
  slot, first, _ = engine.open_from_prefill(snapshot, prompts[0], SamplingParams(), 0, MAX_NEW)
  assert first == reference[0][0] and engine.num_free_slots == 0

@pytest.mark.parametrize("kind", ["autoregressive", "speculative"])
def test_server_only_baselines_emit_the_target_greedy_tokens(pair, workload, kind):
  target, draft = pair
  prompts, reference = workload
  target_engine = E.TargetEngine(target, num_slots=4, max_len=MAX_LEN,
                                 max_tree_nodes=TREE.max_budget + 1, max_batch_size=4)
  draft_engine = (E.DraftEngine(draft, num_slots=4, max_len=MAX_LEN, tree=TREE)
                  if kind == "speculative" else None)
  requests = [EdgeRequest(request_id=f"r{i}", prompt_ids=tuple(p)) for i, p in enumerate(prompts)]
  log = EventLog(None, baselines.SYSTEM_NAMES[kind])
  outputs = baselines.run_baseline(kind, target_engine, requests, max_new_tokens=MAX_NEW,
                                   draft=draft_engine, max_concurrent=3, event_log=log)
  assert [o.tokens for o in outputs] == reference
  assert target_engine.num_free_slots == 4
  _, (summary,) = metrics.summarize_events(log.events)
  assert summary.requests.n_requests == len(prompts)
  assert summary.generated_tokens == sum(len(r) for r in reference)
  ops = {e["op"] for e in log.events if e["kind"] == "server_batch"}
  batch_sizes = [e["batch_size"] for e in log.events
                 if e["kind"] == "server_batch" and e["op"] in ("decode", "verify")]
  assert max(batch_sizes) == 3  # continuous batching keeps 3 requests in flight
  if kind == "autoregressive":
    assert ops == {"prefill", "decode"}
    assert summary.requests.n_verifications == 0
  else:
    assert ops == {"prefill", "draft_prefill", "draft", "verify"}
    assert summary.requests.mean_tokens_per_step > 1.0


@pytest.mark.slow
def test_draft_warmup_can_build_a_proactive_hit(pair):
  """The drafter's warm-up compiles the re-rooting path by committing a result that hits the
  proactive guess; check that the result it builds is a hit."""
  _, draft = pair
  engine = E.DraftEngine(draft, num_slots=1, max_len=MAX_LEN, tree=TREE,
                         proactive=E.ProactiveParams(mode="excluded", max_n_beams=4,
                                                     max_beam_len=2, max_branch_width=4,
                                                     max_budget=6))
  slot = engine.open([3, 1, 4, 1, 5], 9)
  engine.draft(slot)
  engine.draft_proactive(slot)
  guess = engine.proactive_hit_result(slot)
  assert guess is not None
  assert engine.commit(slot, guess) is True
  engine.close(slot)
  engine.warmup()  # and the whole warm-up runs on a live engine
