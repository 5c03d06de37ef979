"""The layer-split baseline (engine/layer_split.py, serving/layer_split.py, launch/layer_split.py).

* With an fp32 wire, greedy output over gRPC is target-only greedy output (`engine.generate` on a
  `TargetEngine`), for two split layers, two edges x K=2, interleaved and taking turns; sampled
  output in process equals the target's for the same seeds.
* bf16 and fp16 wires run, and their agreement with target-only output is measured (printed,
  not assumed).
* The wire format round-trips and refuses bad dtype, shape and byte length.
* Bad hidden-state messages get INVALID_ARGUMENT (out-of-sync steps FAILED_PRECONDITION, unknown
  sessions NOT_FOUND), take no slot, and the server keeps serving the session beside them.
* The events summarize with `measure.metrics.summarize_events` like the other systems'.
* TLS, mutual TLS and tokens, through the existing security helpers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from specedge_jax import api
from specedge_jax.engine import TargetEngine, generate
from specedge_jax.engine import layer_split as E
from specedge_jax.measure import metrics
from specedge_jax.serving import layer_split as S
from specedge_jax.serving import security as sec
from specedge_jax.serving.drafter import EdgeRequest
from specedge_jax.serving.proto import layer_split_pb2 as pb
from specedge_jax.serving.proto import layer_split_pb2_grpc as pb_grpc
from specedge_jax.serving.serving_config import ServingConfig
from specedge_jax.testing import tiny_models

VOCAB, NUM_LAYERS, MAX_NEW = 64, 4, 12
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Tiny:
  model: object
  prompts: list[list[int]]
  reference: list[list[int]]  # target-only greedy

  def requests(self, count: int | None = None) -> list[EdgeRequest]:
    return [EdgeRequest(request_id=f"r{i}", prompt_ids=tuple(p), seed=i)
            for i, p in enumerate(self.prompts[:count])]


@pytest.fixture(scope="module")
def tiny() -> Tiny:
  target, _ = tiny_models.make_pair(vocab_size=VOCAB, num_layers=NUM_LAYERS)
  # Up to 24 tokens: with prefill chunks of 16 and 8, prompts stream in one to three chunks.
  prompts = tiny_models.prompts(6, VOCAB, seed=1)
  engine = TargetEngine(target, num_slots=4, max_len=64, max_tree_nodes=1, max_batch_size=4)
  return Tiny(target, prompts, generate(engine, prompts, max_new_tokens=MAX_NEW).tokens)


def make_config(*, num_edges: int = 2, k: int = 2, interleave: bool = True,
                batching: str = "dynamic") -> ServingConfig:
  return ServingConfig.from_mapping({
      "name": "tiny", "models": {"target": "unused", "draft": "unused"},
      "server": {"num_slots": 4, "max_batch_size": 4, "max_len": 64, "prefill_chunk": 16,
                 "batching": {"mode": batching, "static_timeout_s": 2.0}},
      "edge": {"num_drafters": num_edges, "requests_per_drafter": k, "interleave": interleave,
               "max_len": 64},
      "workload": {"max_new_tokens": MAX_NEW}})


def run(coro):
  return asyncio.run(asyncio.wait_for(coro, timeout=120))


# -- exactness and the report ----------------------------------------------------------------------


# Taking turns (interleave False) keeps all but one session of an edge from sending, so it is
# paired with dynamic batching: a static batch would wait for the sessions that cannot come.
@pytest.mark.parametrize("split_layer,interleave,batching", [
    (1, False, "dynamic"), pytest.param(3, True, "static", marks=pytest.mark.slow)])
def test_fp32_wire_over_grpc_is_target_only_greedy(tiny, split_layer, interleave, batching):
  config = make_config(interleave=interleave, batching=batching)
  result = S.run_layer_split(config, split_layer, "fp32", requests=tiny.requests(),
                             model=tiny.model)
  assert [o.tokens for o in result.outputs] == tiny.reference
  assert all(o.finish_reason == "length" and not o.error for o in result.outputs)

  # The events summarize like SpecEdge's and the baselines'.
  _, summaries = metrics.summarize_events(result.events)
  assert len(summaries) == 1
  summary = summaries[0]
  assert summary.system == "layer_split"
  assert summary.requests.n_requests == len(tiny.prompts)
  assert summary.generated_tokens == sum(len(t) for t in tiny.reference)
  assert summary.n_clients == 2 and summary.n_edges == 2
  assert summary.server_compute_s > 0 and summary.throughput_per_compute_s > 0
  assert summary.requests.ttft.count == len(tiny.prompts)
  assert summary.requests.itl.count == sum(len(t) - 1 for t in tiny.reference)
  assert summary.requests.n_verifications == 0  # no speculation: no acceptance figures
  ops = {e["op"] for e in result.events if e["kind"] == "server_batch"}
  assert ops == {"prefill", "decode"}
  phases = [e["phase"] for e in result.events if e["kind"] == "request_step"]
  assert phases.count("prefill") == len(tiny.prompts)
  assert phases.count("decode") == sum(len(t) - 1 for t in tiny.reference)
  busy_ops = {e["op"] for e in result.events if e["kind"] == "edge_busy"}
  assert busy_ops == {"prefill", "decode", "close"}
  decode_batches = [e["batch_size"] for e in result.events
                    if e["kind"] == "server_batch" and e["op"] == "decode"]
  if batching == "static":  # four sessions in flight: their Steps share forwards
    assert max(decode_batches) > 1


@pytest.mark.slow
def test_rounding_wires_run_and_report_their_agreement(tiny, tmp_path):
  config = make_config(num_edges=1, k=2)
  for wire in ("bf16", "fp16"):
    result = S.run_layer_split(config, 2, wire, requests=tiny.requests(),
                               model=tiny.model, events_dir=str(tmp_path / wire))
    assert [os.path.basename(p) for p in result.event_paths] == ["tail.jsonl", "edge0.jsonl"]
    for output, reference in zip(result.outputs, tiny.reference):
      assert output.finish_reason in ("length", "eos") and not output.error
      assert 1 <= len(output.tokens) <= MAX_NEW
    agreement = E.greedy_agreement(tiny.reference, [o.tokens for o in result.outputs])
    print(f"{wire} wire, split 2, tiny random model: {agreement.identical_requests}/"
          f"{agreement.requests} requests identical, {agreement.prefix_fraction:.3f} of tokens "
          "before the first divergence")
    assert 0.0 <= agreement.prefix_fraction <= 1.0


def test_in_process_split_is_exact_greedy_and_sampled(tiny):
  target = TargetEngine(tiny.model, num_slots=4, max_len=64, max_tree_nodes=1, max_batch_size=4)
  sampling = api.SamplingParams(temperature=1.0, top_k=20)
  sampled = generate(target, tiny.prompts, sampling=sampling, max_new_tokens=MAX_NEW,
                     seed=7).tokens
  head = E.HeadEngine(tiny.model, 2, num_slots=4, max_len=64, max_batch_size=4, prefill_chunk=16)
  tail = E.TailEngine(tiny.model, 2, num_slots=4, max_len=64, max_batch_size=4, prefill_chunk=16)
  assert E.generate(head, tail, tiny.prompts, max_new_tokens=MAX_NEW) == tiny.reference
  assert E.generate(head, tail, tiny.prompts, sampling=sampling, max_new_tokens=MAX_NEW,
                    seed=7) == sampled
  assert head.num_free_slots == 4 and tail.num_free_slots == 4
  agreement = E.greedy_agreement(tiny.reference, tiny.reference)
  assert agreement.identical_fraction == 1.0 and agreement.prefix_fraction == 1.0


def test_greedy_agreement_counts_the_common_prefix():
  agreement = E.greedy_agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 4], [5, 6]])
  assert (agreement.identical_requests, agreement.tokens_before_divergence,
          agreement.matching_positions, agreement.reference_tokens) == (1, 4, 5, 6)


# -- the wire format -------------------------------------------------------------------------------


def test_hidden_states_round_trip_and_validation():
  rng = np.random.default_rng(0)
  values = rng.standard_normal((3, 8)).astype(np.float32)
  exact = E.HiddenStates.from_array(values, "fp32")
  assert exact.shape == (3, 8) and len(exact.data) == 3 * 8 * 4
  np.testing.assert_array_equal(exact.to_array(), values)
  for wire, dtype in (("bf16", E.WIRE_DTYPES["bf16"]), ("fp16", np.float16)):
    encoded = E.HiddenStates.from_array(values, wire)
    assert len(encoded.data) == 3 * 8 * 2
    np.testing.assert_array_equal(encoded.to_array(), values.astype(dtype).astype(np.float32))
  # Little-endian on the wire: 1.0 is 0x3c00 in fp16 and 0x3f80 in bf16.
  assert E.HiddenStates.from_array(np.ones(1), "fp16").data == b"\x00\x3c"
  assert E.HiddenStates.from_array(np.ones(1), "bf16").data == b"\x80\x3f"
  with pytest.raises(ValueError, match="dtype must be one of"):
    E.HiddenStates(shape=(1, 2), dtype="int8", data=b"\x00\x00")
  with pytest.raises(ValueError, match="need 16 bytes, got 15"):
    E.HiddenStates(shape=(2, 2), dtype="fp32", data=b"\x00" * 15)
  with pytest.raises(ValueError, match=r"shape must be \[rows, hidden_size\]"):
    E.HiddenStates(shape=(2, 2, 1), dtype="fp32", data=b"\x00" * 16)
  bad = values.copy()
  bad[2, 5] = np.nan
  with pytest.raises(ValueError, match=r"non-finite value \(row 2\)"):
    E.HiddenStates.from_array(bad, "fp32").to_array()


# -- bad input over gRPC ---------------------------------------------------------------------------


async def status_of(call) -> grpc.aio.AioRpcError:
  with pytest.raises(grpc.aio.AioRpcError) as info:
    await call
  return info.value


def test_bad_messages_are_refused_and_the_server_keeps_serving(tiny):
  split, prompt, reference = 2, tiny.prompts[0], tiny.reference[0]
  head = E.HeadEngine(tiny.model, split, num_slots=1, max_len=64, prefill_chunk=16)
  tail = E.TailEngine(tiny.model, split, num_slots=3, max_len=64, max_batch_size=2,
                      prefill_chunk=16)
  hidden_size = tiny.model.config.hidden_size
  head_slot = head.open(prompt, MAX_NEW)
  prompt_hidden = head.prefill(head_slot)

  def hidden(values, wire="fp32", **override) -> pb.HiddenStates:
    message = S.hidden_to_proto(E.HiddenStates.from_array(values, wire))
    for name, value in override.items():
      if name == "shape":
        del message.shape[:]
        message.shape.extend(value)
      else:
        setattr(message, name, value)
    return message

  def request(**fields) -> pb.OpenRequest:
    return pb.OpenRequest(**{"prompt_tokens": len(prompt), "max_new_tokens": MAX_NEW,
                             "client_id": "test", **fields})

  async def stream(*chunks):
    for chunk in chunks:
      yield chunk

  async def main():
    server = S.LayerSplitServer(tail)
    port = await server.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.LayerSplitTailStub(channel)
    try:
      # A good session, in two chunks.
      opened = await stub.Open(stream(
          pb.OpenChunk(request=request(request_id="good"), hidden=hidden(prompt_hidden[:5])),
          pb.OpenChunk(hidden=hidden(prompt_hidden[5:]))))
      tokens = [opened.first_token]

      bad_opens = {
          "dtype HIDDEN_DTYPE_UNSPECIFIED is not one of":
              [pb.OpenChunk(request=request(), hidden=hidden(prompt_hidden, dtype=0))],
          "shape must be \\[rows, hidden_size\\], got 3 dimensions":
              [pb.OpenChunk(request=request(),
                            hidden=hidden(prompt_hidden, shape=[1, len(prompt), hidden_size]))],
          f"hidden_size is {hidden_size + 1}; this server's model has {hidden_size}":
              [pb.OpenChunk(request=request(), hidden=hidden(
                  np.zeros((len(prompt), hidden_size + 1), np.float32)))],
          "needs .* bytes of data, got":
              [pb.OpenChunk(request=request(), hidden=hidden(
                  prompt_hidden, data=hidden(prompt_hidden).data[:-1]))],
          "non-finite value":
              [pb.OpenChunk(request=request(), hidden=hidden(
                  np.full_like(prompt_hidden, np.inf)))],
          f"{len(prompt) + 1} rows; this message takes 1 to {len(prompt)}":
              [pb.OpenChunk(request=request(), hidden=hidden(
                  np.concatenate([prompt_hidden, prompt_hidden[:1]])))],
          f"ended after 5 of the prompt's {len(prompt)} rows":
              [pb.OpenChunk(request=request(), hidden=hidden(prompt_hidden[:5]))],
          "the first OpenChunk must carry the request":
              [pb.OpenChunk(hidden=hidden(prompt_hidden))],
          "OpenChunk 1 carries a request":
              [pb.OpenChunk(request=request(), hidden=hidden(prompt_hidden[:5])),
               pb.OpenChunk(request=request(), hidden=hidden(prompt_hidden[5:]))],
          "OpenChunk 0 carries no hidden states": [pb.OpenChunk(request=request())],
          "carried no message": [],
          "prompt_tokens must be in": [pb.OpenChunk(request=request(prompt_tokens=0))],
          "needs .* cache rows": [pb.OpenChunk(request=request(max_new_tokens=60),
                                               hidden=hidden(prompt_hidden))],
      }
      for pattern, chunks in bad_opens.items():
        error = await status_of(stub.Open(stream(*chunks)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (pattern, error.details())
        assert re.search(pattern, error.details()), (pattern, error.details())
      raw_open = channel.stream_unary("/specedge.layersplit.v1.LayerSplitTail/Open")
      error = await status_of(raw_open(stream(b"\x0a\xff")))
      assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
      assert "OpenChunk 0 does not decode" in error.details()

      # Bad Steps of the good session.
      decoded = head.decode([(head_slot, tokens[-1])])
      session = opened.session_id
      bad_steps = {
          (grpc.StatusCode.INVALID_ARGUMENT, "1 to 1"):
              pb.StepRequest(session_id=session, step=0,
                             hidden=hidden(np.concatenate([decoded, decoded]))),
          (grpc.StatusCode.INVALID_ARGUMENT, "dtype 7 is not one of"):
              pb.StepRequest(session_id=session, step=0, hidden=hidden(decoded, dtype=7)),
          (grpc.StatusCode.INVALID_ARGUMENT, "non-finite"):
              pb.StepRequest(session_id=session, step=0, hidden=hidden(decoded * np.nan)),
          (grpc.StatusCode.INVALID_ARGUMENT, "hidden is missing"):
              pb.StepRequest(session_id=session, step=0),
          (grpc.StatusCode.FAILED_PRECONDITION, "step 3, but the session has applied 0"):
              pb.StepRequest(session_id=session, step=3, hidden=hidden(decoded)),
          (grpc.StatusCode.NOT_FOUND, "no open session"):
              pb.StepRequest(session_id="f" * 32, step=0, hidden=hidden(decoded)),
          (grpc.StatusCode.INVALID_ARGUMENT, "session_id has 65 characters"):
              pb.StepRequest(session_id="f" * 65, step=0, hidden=hidden(decoded)),
      }
      for (code, text), step_request in bad_steps.items():
        error = await status_of(stub.Step(step_request))
        assert error.code() == code and text in error.details(), (text, error.details())
      raw_step = channel.unary_unary("/specedge.layersplit.v1.LayerSplitTail/Step")
      error = await status_of(raw_step(b"\x12\xff"))
      assert error.code() == grpc.StatusCode.INVALID_ARGUMENT

      # The good session goes on to exactly the target's output; a retried step is idempotent.
      step = 0
      while True:
        answer = await stub.Step(pb.StepRequest(session_id=session, step=step,
                                                hidden=hidden(decoded)))
        again = await stub.Step(pb.StepRequest(session_id=session, step=step,
                                               hidden=hidden(decoded)))
        assert again == answer
        tokens.append(answer.token)
        step += 1
        if answer.finished:
          break
        decoded = head.decode([(head_slot, answer.token)])
      assert tokens == reference
      error = await status_of(stub.Step(pb.StepRequest(session_id=session, step=step,
                                                       hidden=hidden(decoded))))
      assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
      closed = await stub.Close(pb.CloseRequest(session_id=session))
      assert closed.generated_tokens == len(reference)
      assert (await status_of(stub.Close(pb.CloseRequest(session_id=session)))).code() == (
          grpc.StatusCode.NOT_FOUND)
      await asyncio.sleep(0.1)  # the refused opens' closes run on the engine thread
      assert not server.servicer.sessions
    finally:
      await channel.close()
      await server.stop(grace=None)

  run(main())
  assert tail.num_free_slots == 3  # no refused open kept a slot


@pytest.mark.slow
def test_opens_beyond_the_slots_are_refused_and_retried(tiny):
  """Three requests on one edge against a one-slot server: the edge backs off on
  RESOURCE_EXHAUSTED and every request still ends with the target's output."""
  config = dataclasses.replace(
      make_config(num_edges=1, k=3),
      server=dataclasses.replace(make_config().server, num_slots=1, max_batch_size=1))
  result = S.run_layer_split(config, 2, "fp32", requests=tiny.requests(3), model=tiny.model)
  assert [o.tokens for o in result.outputs] == tiny.reference[:3]


# -- security --------------------------------------------------------------------------------------


@pytest.mark.slow  # the verifier's TLS and tokens are held in the inner loop by test_security.py
def test_mutual_tls_and_tokens(tiny, tmp_path):
  pki = sec.make_test_pki(str(tmp_path / "ca"))
  tokens_file = sec.make_tokens(str(tmp_path / "tokens"), ["edge0"])
  token = sec.read_token_file(sec.token_file(str(tmp_path / "tokens"), "edge0"))
  server_security = sec.ServerSecurity(cert_file=pki["server_cert"], key_file=pki["server_key"],
                                       client_ca_file=pki["ca_cert"], tokens_file=tokens_file)
  client_security = sec.ClientSecurity(ca_file=pki["ca_cert"], cert_file=pki["client_cert"],
                                       key_file=pki["client_key"], token=token)
  result = S.run_layer_split(make_config(num_edges=1, k=2), 2, "fp32", requests=tiny.requests(2),
                             model=tiny.model, server_security=server_security,
                             client_security=client_security)
  assert [o.tokens for o in result.outputs] == tiny.reference[:2]

  tail = E.TailEngine(tiny.model, 2, num_slots=1, max_len=64, max_batch_size=1)

  async def refused():
    server = S.LayerSplitServer(tail, security=server_security)
    port = await server.start("127.0.0.1:0")
    try:
      no_token = dataclasses.replace(client_security, token="")
      async with sec.open_channel(f"127.0.0.1:{port}", no_token) as channel:
        error = await status_of(pb_grpc.LayerSplitTailStub(channel).Close(
            pb.CloseRequest(session_id="x")))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
      await S.wait_for_tail(f"127.0.0.1:{port}", 10.0, no_token)  # health stays open
    finally:
      await server.stop(grace=None)

  run(refused())
  with pytest.raises(sec.SecurityConfigError, match="allow_insecure"):
    run(S.LayerSplitServer(tail, security=sec.ServerSecurity()).start("127.0.0.1:0"))


# -- the launcher ----------------------------------------------------------------------------------


def _launcher_flags(dirs):
  """`launch.layer_split` flags for the served pair on a small workload."""
  return [f"--config.models.target={dirs['target']}", f"--config.models.draft={dirs['draft']}",
          "--config.workload.num_requests=3", "--config.workload.max_new_tokens=8",
          "--config.edge.num_drafters=1", "--config.edge.simulated_rtt_ms=0", "--split_layer=1"]


@pytest.mark.slow
def test_launcher_tail_and_head_processes(served_pair_dirs, tmp_path):
  """`launch.layer_split --role=tail` and `--role=head` as processes over plaintext (bf16 wire)."""
  common = _launcher_flags(served_pair_dirs)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  port_file = tmp_path / "port"
  tail = subprocess.Popen(
      [sys.executable, "-m", "launch.layer_split", "--role=tail", "--allow_insecure", "--port=0",
       f"--port_file={port_file}", f"--event_log={tmp_path / 'tail.jsonl'}", *common],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    for _ in range(600):
      if port_file.exists() or tail.poll() is not None:
        break
      time.sleep(0.2)
    assert port_file.exists(), tail.communicate(timeout=5)[0][-3000:]
    head = subprocess.run(
        [sys.executable, "-m", "launch.layer_split", "--role=head", "--allow_insecure",
         f"--server=127.0.0.1:{port_file.read_text()}", "--wire_dtype=bf16",
         f"--event_log={tmp_path / 'edge0.jsonl'}", *common],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert head.returncode == 0, head.stdout[-3000:] + head.stderr[-3000:]
    assert "3 requests" in head.stdout and "0 failed" in head.stdout
  finally:
    tail.terminate()
    tail.wait(timeout=60)
  from specedge_jax.measure import events as events_lib  # pylint: disable=g-import-not-at-top

  _, summaries = metrics.summarize_events(events_lib.read_events(
      [tmp_path / "tail.jsonl", tmp_path / "edge0.jsonl"]))
  assert summaries[0].system == "layer_split" and summaries[0].requests.n_requests == 3


# Heavy (15 s, CI's time budget): `--role=local` runs the in-process split that
# test_in_process_split_is_exact_greedy_and_sampled pins; this adds its launcher and report.
@pytest.mark.heavy
@pytest.mark.slow
def test_launcher_local_role_compares_with_target_only(served_pair_dirs, tmp_path):
  common = _launcher_flags(served_pair_dirs)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  local = subprocess.run(
      [sys.executable, "-m", "launch.layer_split", "--role=local", "--compare_target_only",
       f"--out_dir={tmp_path / 'local'}", *common],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
  assert "Run summary" in local.stdout and "3 / 3" in local.stdout  # fp32: all identical
