"""Heterogeneous drafters: edges with different draft models on one verifier, and the tokenizer
check at OpenSession that keeps a draft of another vocabulary out.

Fast: the refusal over real gRPC with the fake engines (a drafter whose tokenizer is a tiny BPE
trained here, against a verifier holding the embedded target's), the config and the command
lines that give each drafter its model, and the start-up check of a draft's vocabulary. Slow:
two drafters running different draft models through the launchers' functions
(`runners.serve_verifier`, `runners.run_drafter`) emit exactly target-only greedy decoding.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import types

import grpc
import pytest

from specedge_jax.data import assets
from specedge_jax.data import tokenizer_fingerprint as fp
from specedge_jax.data.tokenizers import load_tokenizer
from specedge_jax.serving import local
from specedge_jax.serving.drafter import Drafter, DrafterConfig, EdgeRequest, TokenizerRefused
from specedge_jax.serving.proto import specedge_pb2 as pb
from specedge_jax.serving.serving_config import ModelsConfig, ServingConfig
from specedge_jax.testing.fakes import FakeDraftEngine, FakeTargetEngine, expected_output
from specedge_jax.testing.servers import running_verifier
from specedge_jax.training import bpe_tokenizer

VOCAB = 50  # the fake engines'


def run(coro):
  return asyncio.run(asyncio.wait_for(coro, timeout=60))


@pytest.fixture(scope="module")
def target_tokenizer():
  return fp.of_tokenizer(load_tokenizer(assets.DEFAULT_TARGET_DIR))


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
  """A tiny byte-level BPE with the embedded recipe's special tokens: another vocabulary."""
  texts = ["The quick brown fox jumps over the lazy dog. " * 3,
           "def f(x):\n    return x ** 2\n", "Why is the sky blue? Rayleigh scattering."] * 8
  folder = str(tmp_path_factory.mktemp("tiny_tokenizer"))
  bpe_tokenizer.save_tokenizer(bpe_tokenizer.train_tokenizer(texts, vocab_size=323), folder)
  return fp.of_tokenizer(load_tokenizer(folder))


def _open(tokenizer: fp.TokenizerFingerprint | None = None, **fields) -> pb.OpenSessionRequest:
  request = pb.OpenSessionRequest(prompt_token_ids=[1, 2, 3], max_new_tokens=4, **fields)
  if tokenizer is not None:
    request.tokenizer.CopyFrom(pb.TokenizerFingerprint(**tokenizer.to_fields()))
  return request


def test_a_drafter_with_another_tokenizer_is_refused_naming_the_difference(target_tokenizer,
                                                                           tiny_tokenizer):
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=4)
  requests = [EdgeRequest(request_id=f"r{i}", prompt_ids=(1, 2 + i)) for i in range(3)]
  expected = ("the drafter's tokenizer is not the target's: vocab size "
              f"{tiny_tokenizer.vocab_size} (drafter) vs 4096 (target); vocabulary hash differs")

  async def scenario():
    async with running_verifier(target, tokenizer_fingerprint=target_tokenizer) as (
        _, channel, stub):
      # Through the drafter: the run fails as a whole, at once (no retry until a give-up time).
      drafter = Drafter(FakeDraftEngine(vocab_size=VOCAB), channel,
                        DrafterConfig(max_new_tokens=4, tokenizer=tiny_tokenizer))
      loop = asyncio.get_running_loop()
      started = loop.time()
      with pytest.raises(TokenizerRefused) as refused:
        await drafter.run(requests)
      assert loop.time() - started < 5.0
      assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
      assert str(refused.value) == f"OpenSession: FAILED_PRECONDITION: {expected}"
      # On the wire: the status, the message, and the metadata that tells an edge why.
      with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.OpenSession(_open(tiny_tokenizer))
      assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
      assert info.value.details() == expected
      assert ("specedge-refused", "tokenizer") in tuple(info.value.trailing_metadata())
      # One changed special token is named alone.
      moved = dict(target_tokenizer.special_token_ids, eos_token=2)
      with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.OpenSession(_open(dataclasses.replace(
            target_tokenizer, special_tokens=tuple(sorted(moved.items())))))
      assert info.value.details() == ("the drafter's tokenizer is not the target's: eos_token id "
                                      "2 (drafter) vs 0 (target)")
      # The target's own tokenizer opens, and so does an old client that sends none.
      for tokenizer in (target_tokenizer, None):
        opened = await stub.OpenSession(_open(tokenizer))
        await stub.CloseSession(pb.CloseSessionRequest(session_id=opened.session_id))

  run(scenario())
  # Nothing refused reached the engine: only the two accepted opens did.
  assert target.opened_prompts == [(1, 2, 3), (1, 2, 3)]
  assert target.num_free_slots == 4


def test_without_a_tokenizer_the_verifier_still_refuses_a_vocabulary_beyond_its_model(
    tiny_tokenizer):
  target = FakeTargetEngine(vocab_size=VOCAB)

  async def scenario():
    async with running_verifier(target) as (_, channel, stub):
      with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.OpenSession(_open(tiny_tokenizer))
      assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
      assert info.value.details() == (f"the drafter's tokenizer has {tiny_tokenizer.vocab_size} "
                                      f"tokens, more than the target model's vocab_size {VOCAB}")
      # A vocabulary that fits is accepted unchecked: the drafter's output is the target's.
      small = dataclasses.replace(tiny_tokenizer, vocab_size=VOCAB)
      drafter = Drafter(FakeDraftEngine(vocab_size=VOCAB), channel,
                        DrafterConfig(max_new_tokens=6, tokenizer=small))
      return await drafter.run([EdgeRequest(request_id="r", prompt_ids=(3, 4))])

  [output] = run(scenario())
  assert output.tokens == expected_output((3, 4), 6, VOCAB)


# -- which drafter runs which model -------------------------------------------------------------


def test_drafts_are_dealt_round_robin_and_checked():
  models = ModelsConfig(target="t", draft="d", drafts=["a", "b"])  # a JSON list becomes a tuple
  assert models.drafts == ("a", "b")
  assert [models.draft_for(i) for i in range(5)] == ["a", "b", "a", "b", "a"]
  assert ModelsConfig(target="t", draft="d").draft_for(3) == "d"
  config = ServingConfig(name="mixed", models=models)
  assert ServingConfig.from_mapping(json.loads(json.dumps(config.to_dict()))) == config
  for bad in ("a", ["a", ""], [3]):
    with pytest.raises(ValueError, match="models.drafts"):
      ModelsConfig(target="t", draft="d", drafts=bad)


def test_launch_local_gives_each_drafter_its_model(tmp_path):
  options = local.LocalOptions(out_dir=str(tmp_path))
  argvs = local.child_argvs(options, 3, config_path="run/config.json", port=4321,
                            server_security=["--allow_insecure"],
                            drafter_security=[["--allow_insecure"]] * 3,
                            draft_dirs=["/m/draft", "/m/draft_small", "/m/draft"])
  assert [[f for f in argvs[f"drafter{i}"] if f.startswith("--draft=")] for i in range(3)] == [
      ["--draft=/m/draft"], ["--draft=/m/draft_small"], ["--draft=/m/draft"]]
  assert not any(f.startswith("--draft") for f in argvs["verifier"])
  with pytest.raises(ValueError, match="2 draft_dirs for 3 drafters"):
    local.child_argvs(options, 3, config_path="c", port=1, server_security=[],
                      drafter_security=[[]] * 3, draft_dirs=["a", "b"])


def test_a_drafter_runs_its_own_model_and_sends_its_tokenizer(target_tokenizer):
  from specedge_jax.serving import runners  # pylint: disable=g-import-not-at-top (loads JAX)

  config = ServingConfig(name="mixed", models=ModelsConfig(
      target=assets.DEFAULT_TARGET_DIR, draft=assets.DEFAULT_DRAFT_DIR,
      drafts=(assets.DEFAULT_DRAFT_DIR, assets.SMALL_DRAFT_DIR)))
  second = runners.with_drafter_model(config, 1)
  assert second.models.draft == assets.SMALL_DRAFT_DIR and second.models.drafts == ()
  assert runners.draft_model_name(second) == "draft_small"
  # The draft folder's own tokenizer is the one sent: here, the target's.
  assert runners.edge_tokenizer(second) == target_tokenizer
  # A draft whose embedding has fewer rows than its tokenizer has ids is refused at start-up.
  narrow = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=4000))
  with pytest.raises(ValueError, match="the draft model .*draft_small has vocab_size 4000, "
                                       "fewer rows than its tokenizer's 4096 tokens"):
    runners.build_draft_engine(second, model=narrow, tokenizer=target_tokenizer)


# -- mixed draft models, real engines ------------------------------------------------------------


@pytest.fixture(scope="module")
def other_draft_dir(served_pair_dirs, tmp_path_factory):
  """A second draft for the served pair's target: another architecture (one layer) and random
  weights, with the target's tokenizer files, so it drafts badly but is admitted."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from specedge_jax.checkpoints import hf  # pylint: disable=g-import-not-at-top
  from specedge_jax.models import model_config, transformer  # pylint: disable=g-import-not-at-top

  vocab = hf.load_hf_model(served_pair_dirs["target"]).config.vocab_size
  config = model_config.tiny_config("qwen3", vocab_size=vocab, num_layers=1)
  model = transformer.Transformer(config, rngs=nnx.Rngs(7))
  folder = str(tmp_path_factory.mktemp("mixed") / "other_draft")
  hf.save_hf(folder, model.config, hf.params_of(model))
  bpe_tokenizer.save_tokenizer(load_tokenizer(served_pair_dirs["target"]), folder)
  return folder


@pytest.mark.slow
def test_mixed_draft_models_stay_greedy_equivalent_to_target_only(served_pair_dirs,
                                                                  other_draft_dir, tmp_path):
  from specedge_jax.serving import runners, workload  # pylint: disable=g-import-not-at-top
  from specedge_jax.testing import live_stack  # pylint: disable=g-import-not-at-top

  mapping = live_stack.embedded_config().to_dict()
  mapping["models"].update(target=served_pair_dirs["target"], draft=served_pair_dirs["draft"],
                           drafts=[served_pair_dirs["draft"], other_draft_dir])
  mapping["tree"].update(max_n_beams=4, max_beam_len=3, max_branch_width=4, max_budget=12)
  mapping["server"].update(num_slots=4, max_batch_size=4, max_len=256, attention_min_rows=256)
  mapping["edge"].update(num_drafters=2, requests_per_drafter=2, simulated_rtt_ms=0.0,
                         max_len=256)
  mapping["workload"].update(num_requests=6, max_new_tokens=12)
  config = ServingConfig.from_mapping(mapping)
  events = [str(tmp_path / f"drafter{i}.jsonl") for i in range(2)]

  async def scenario():
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    verifier = asyncio.create_task(runners.serve_verifier(config, port=0, stop=stop,
                                                          on_ready=ready.set_result))
    await asyncio.wait({verifier, ready}, return_when=asyncio.FIRST_COMPLETED)
    address = f"127.0.0.1:{ready.result()}"
    try:
      return await asyncio.gather(*(runners.run_drafter(config, address, client_index=i,
                                                        events_path=events[i])
                                    for i in range(2)))
    finally:
      stop.set()
      await verifier

  per_drafter = asyncio.run(asyncio.wait_for(scenario(), timeout=600))
  requests = [r for i in range(2) for r in workload.requests_for_client(config, i)]
  outputs = {o.request_id: o for outputs in per_drafter for o in outputs}
  assert len(outputs) == len(requests) == 6
  reference = live_stack.reference_greedy(config, [r.prompt_ids for r in requests],
                                          config.workload.max_new_tokens)
  for request, want in zip(requests, reference):
    got = outputs[request.request_id]
    assert got.finish_reason != "error", got.error
    assert got.tokens == want, request.request_id
  # Each drafter's events name the model it ran; the close draft was accepted more.
  names = {}
  for i, path in enumerate(events):
    with open(path) as f:
      starts = [e for e in map(json.loads, f) if e["kind"] == "request_start"]
    names[i] = {e["draft_model"] for e in starts}
  assert names == {0: {"draft"}, 1: {"other_draft"}}
  depth = [sum(sum(o.accepted_depths) for o in outputs) / sum(len(o.accepted_depths)
                                                                for o in outputs)
           for outputs in per_drafter]
  assert depth[0] > depth[1]
