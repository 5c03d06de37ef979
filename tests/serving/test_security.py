"""Transport security and client authentication (specedge_jax/serving/security.py).

Every test runs the real grpc.aio verifier (fake engines) on a free 127.0.0.1 port behind TLS,
mutual TLS or tokens, with a test CA generated into the test's temp folder, and real clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specedge_jax.serving import local, runners
from specedge_jax.serving import security as sec
from specedge_jax.serving.drafter import Drafter, DrafterConfig, EdgeRequest
from specedge_jax.serving.proto import specedge_pb2 as pb
from specedge_jax.serving.proto import specedge_pb2_grpc
from specedge_jax.serving.verifier import VerifierServer
from specedge_jax.testing.fakes import FakeDraftEngine, FakeTargetEngine, expected_output

VOCAB = 50
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(coro):
  return asyncio.run(asyncio.wait_for(coro, timeout=60))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
  folder = tmp_path_factory.mktemp("pki")
  paths = sec.make_test_pki(str(folder / "ca"))
  paths["other_ca"] = sec.make_test_pki(str(folder / "other"))  # an unrelated CA and its leaves
  paths["tokens"] = sec.make_tokens(str(folder / "tokens"), ["edge0", "edge1"])
  paths["token_dir"] = str(folder / "tokens")
  return paths


def token(pki, name="edge0") -> str:
  return sec.read_token_file(sec.token_file(pki["token_dir"], name))


def tls_server(pki, **kwargs) -> sec.ServerSecurity:
  return sec.ServerSecurity(cert_file=pki["server_cert"], key_file=pki["server_key"], **kwargs)


@contextlib.asynccontextmanager
async def serving(security: sec.ServerSecurity, **server_kwargs):
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=4)
  server = VerifierServer(target, security=security, **server_kwargs)
  port = await server.start("127.0.0.1:0")
  try:
    yield server, f"127.0.0.1:{port}"
  finally:
    await server.stop(grace=None)


async def open_session(channel, timeout=10.0, **kwargs):
  return await specedge_pb2_grpc.VerifierStub(channel).OpenSession(pb.OpenSessionRequest(
      prompt_token_ids=[1, 2, 3], max_new_tokens=8, **kwargs), timeout=timeout)


async def status_of(call) -> grpc.aio.AioRpcError:
  with pytest.raises(grpc.aio.AioRpcError) as info:
    await call
  return info.value


# -- end to end -----------------------------------------------------------------------------------


def test_tls_and_tokens_end_to_end(pki):
  """A drafter over TLS with its token: greedy outputs are the target's own chain."""
  requests = [EdgeRequest(request_id=f"r{i}", prompt_ids=(1 + i, 5)) for i in range(3)]

  async def scenario():
    async with serving(tls_server(pki, tokens_file=pki["tokens"])) as (server, address):
      client = sec.ClientSecurity(ca_file=pki["ca_cert"], token=token(pki))
      await runners.wait_for_server(address, 10.0, client)
      async with sec.open_channel(address, client) as channel:
        drafter = Drafter(FakeDraftEngine(vocab_size=VOCAB, num_slots=2, correct_depth=2),
                          channel, DrafterConfig(client_id="edge0", max_new_tokens=9))
        outputs = await drafter.run(requests)
      assert not server.servicer.sessions  # every session was closed again
      return outputs

  for request, output in zip(requests, run(scenario())):
    assert output.tokens == expected_output(request.prompt_ids, 9, VOCAB), output.error
    assert output.finish_reason == "length"


def test_mutual_tls_needs_a_client_certificate_of_the_ca(pki):
  async def scenario():
    async with serving(tls_server(pki, client_ca_file=pki["ca_cert"])) as (_, address):
      good = sec.ClientSecurity(ca_file=pki["ca_cert"], cert_file=pki["client_cert"],
                                key_file=pki["client_key"])
      async with sec.open_channel(address, good) as channel:
        assert (await open_session(channel)).session_id
      other = pki["other_ca"]
      for refused in (sec.ClientSecurity(ca_file=pki["ca_cert"]),  # no client certificate
                      sec.ClientSecurity(ca_file=pki["ca_cert"], cert_file=other["client_cert"],
                                         key_file=other["client_key"])):  # another CA's
        async with sec.open_channel(address, refused) as channel:
          error = await status_of(open_session(channel, timeout=5.0))
          assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()

  run(scenario())


def test_a_client_trusting_another_ca_cannot_connect(pki):
  async def scenario():
    async with serving(tls_server(pki)) as (_, address):
      wrong = sec.ClientSecurity(ca_file=pki["other_ca"]["ca_cert"])
      async with sec.open_channel(address, wrong) as channel:
        error = await status_of(open_session(channel, timeout=5.0))
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
      # The readiness wait says why it gave up (the handshake, not a missing server).
      with pytest.raises(TimeoutError, match="UNAVAILABLE"):
        await runners.wait_for_server(address, 0.3, wrong)
      # A plaintext client cannot talk to the TLS port either.
      async with sec.open_channel(address, sec.ClientSecurity(allow_insecure=True)) as channel:
        error = await status_of(open_session(channel, timeout=5.0))
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()

  run(scenario())


def test_server_name_override_checks_the_certificate_against_that_name(pki):
  async def scenario():
    async with serving(tls_server(pki)) as (_, address):
      named = sec.ClientSecurity(ca_file=pki["ca_cert"], server_name_override="localhost")
      async with sec.open_channel(address, named) as channel:
        assert (await open_session(channel)).session_id
      unnamed = sec.ClientSecurity(ca_file=pki["ca_cert"], server_name_override="elsewhere.test")
      async with sec.open_channel(address, unnamed) as channel:
        error = await status_of(open_session(channel, timeout=5.0))
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()

  run(scenario())


# -- tokens ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
def test_every_rpc_needs_a_known_token_and_health_needs_none(pki, tls):
  """No token and a wrong token: UNAUTHENTICATED on every Verifier RPC (and on unknown methods),
  never echoing the token; the health service answers anyway. Over TLS the token travels as
  call credentials, in plaintext through the client interceptor."""
  wrong_token = "not-a-valid-token-0123456789"
  server_security = (tls_server(pki, tokens_file=pki["tokens"]) if tls else
                     sec.ServerSecurity(tokens_file=pki["tokens"], allow_insecure=True))

  def client(tok: str) -> sec.ClientSecurity:
    return (sec.ClientSecurity(ca_file=pki["ca_cert"], token=tok) if tls else
            sec.ClientSecurity(token=tok, allow_insecure=True))

  async def scenario():
    async with serving(server_security) as (server, address):
      async with sec.open_channel(address, client(token(pki, "edge1"))) as channel:
        opened = await open_session(channel)  # the right token works
      for tok, refusal in (("", "missing bearer token"), (wrong_token, "unknown bearer token")):
        async with sec.open_channel(address, client(tok)) as channel:
          stub = specedge_pb2_grpc.VerifierStub(channel)
          calls = [
              stub.OpenSession(pb.OpenSessionRequest(prompt_token_ids=[1], max_new_tokens=4)),
              stub.Verify(pb.VerifyRequest(session_id=opened.session_id,
                                           root_token=opened.first_token)),
              stub.CloseSession(pb.CloseSessionRequest(session_id=opened.session_id)),
              channel.unary_unary("/specedge.v1.Verifier/NoSuchMethod")(b""),
          ]
          for call in calls:
            error = await status_of(call)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
            assert error.details().startswith(refusal)  # the interceptor's, not the handler's
            assert wrong_token not in error.details()
          reply = await health_pb2_grpc.HealthStub(channel).Check(
              health_pb2.HealthCheckRequest(service="specedge.v1.Verifier"), timeout=5)
          assert reply.status == health_pb2.HealthCheckResponse.SERVING
      assert set(server.servicer.sessions) == {opened.session_id}  # nothing reached it
      # The servicer learnt who opened the session (identify = Authenticator.client_of).
      assert server.servicer.sessions[opened.session_id].owner == "edge1"

  run(scenario())


def test_authenticator_names_the_client_in_constant_time_compare(pki):
  tokens = json.loads(open(pki["tokens"]).read())
  auth = sec.Authenticator(tokens)
  assert auth.client_of([("authorization", f"Bearer {tokens['edge1']}")]) == "edge1"
  assert auth.client_of([("user-agent", "x"),
                         ("authorization", f"bearer {tokens['edge0']}".encode())]) == "edge0"
  assert auth.client_of([("authorization", "Bearer wrong")]) is None
  assert auth.client_of([("authorization", f"Basic {tokens['edge0']}")]) is None
  assert auth.client_of([("authorization", "Bearer tökén")]) is None  # not ASCII: unknown
  assert auth.client_of([]) is None and auth.client_of(None) is None
  assert auth.client_names == ("edge0", "edge1")
  for text in (repr(auth), repr(sec.ClientSecurity(token=tokens["edge0"], allow_insecure=True))):
    assert tokens["edge0"] not in text
  with pytest.raises(sec.SecurityConfigError, match="same token"):
    sec.Authenticator({"a": "t0k3n", "b": "t0k3n"})


def test_make_tokens_writes_owner_only_files(pki):
  tokens = sec.read_tokens(pki["tokens"])
  assert set(tokens) == {"edge0", "edge1"} and len(set(tokens.values())) == 2
  for path in (pki["tokens"], pki["server_key"], pki["client_key"],
               sec.token_file(pki["token_dir"], "edge0")):
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
  assert token(pki, "edge1") == tokens["edge1"]
  with pytest.raises(ValueError, match="plain file names"):
    sec.make_tokens(pki["token_dir"], ["../escape"])


# -- refusals and config errors -------------------------------------------------------------------


def test_plaintext_is_refused_without_allow_insecure():
  async def scenario():
    server = VerifierServer(FakeTargetEngine(vocab_size=VOCAB), security=sec.ServerSecurity())
    with pytest.raises(sec.SecurityConfigError, match="--allow_insecure"):
      await server.start("127.0.0.1:0")
    assert server.worker is None  # refused before any thread or port
    with pytest.raises(sec.SecurityConfigError, match="--allow_insecure"):
      sec.open_channel("127.0.0.1:1", sec.ClientSecurity(token="abc"))
    with pytest.raises(sec.SecurityConfigError, match="--allow_insecure"):
      # Refused before the config is even read (so before any model would load).
      await runners.run_drafter(None, "127.0.0.1:1",  # type: ignore[arg-type]
                                security=sec.ClientSecurity())
    # Allowed plaintext serves, without tokens as before.
    async with serving(sec.ServerSecurity(allow_insecure=True)) as (_, address):
      async with sec.open_channel(address, sec.ClientSecurity(allow_insecure=True)) as channel:
        assert (await open_session(channel)).session_id

  run(scenario())


def _write(tmp_path, name: str, text: str) -> str:
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_server_config_errors_name_the_field_and_file(pki, tmp_path):
  cert, key = pki["server_cert"], pki["server_key"]
  cases = [
      (dict(cert_file=cert), r"cert_file \(--tls_cert\) is set but .*key_file \(--tls_key\)"),
      (dict(key_file=key), r"key_file \(--tls_key\) is set but .*cert_file"),
      (dict(client_ca_file=pki["ca_cert"], allow_insecure=True),
       r"client_ca_file \(--tls_client_ca\) needs TLS"),
      (dict(cert_file=str(tmp_path / "nope.pem"), key_file=key),
       r"cert_file \(--tls_cert\): no such file .*nope\.pem"),
      (dict(cert_file=_write(tmp_path, "junk.pem", "junk"), key_file=key),
       r"cert_file.*junk\.pem' holds no PEM certificate"),
      (dict(cert_file=cert, key_file=pki["client_key"]),
       r"key_file \(--tls_key\): .*client\.key' is not the key of the certificate"),
      (dict(cert_file=cert, key_file=pki["server_cert"]),
       r"key_file \(--tls_key\): .*not an unencrypted PEM private key"),
      (dict(cert_file=cert, key_file=key, client_ca_file=_write(tmp_path, "empty.pem", "\n")),
       r"client_ca_file \(--tls_client_ca\): .*empty\.pem' is empty"),
      (dict(tokens_file=_write(tmp_path, "bad.json", "{not json"), allow_insecure=True),
       r"tokens_file \(--auth_tokens\): .*bad\.json' is not valid JSON"),
      (dict(tokens_file=_write(tmp_path, "list.json", '["a"]'), allow_insecure=True),
       r"list\.json' must hold a non-empty JSON object"),
      (dict(tokens_file=_write(tmp_path, "empty_token.json", '{"edge0": ""}'),
            allow_insecure=True), r"empty_token\.json', client 'edge0': the token is empty"),
      (dict(tokens_file=_write(tmp_path, "spaces.json", '{"edge0": "a b"}'),
            allow_insecure=True), r"client 'edge0': a token must be printable ASCII"),
      (dict(tokens_file=_write(tmp_path, "number.json", '{"edge0": 5}'), allow_insecure=True),
       r"the token of client 'edge0' is not a string"),
      (dict(tokens_file=_write(tmp_path, "dup.json", '{"a": "tok123", "b": "tok123"}'),
            allow_insecure=True), r"clients 'a' and 'b' have the same token"),
      (dict(tokens_file=_write(tmp_path, "twice.json", '{"a": "tok1", "a": "tok2"}'),
            allow_insecure=True), r"names client 'a' twice"),
  ]
  for kwargs, message in cases:
    with pytest.raises(sec.SecurityConfigError, match=message):
      sec.ServerSecurity(**kwargs)
  # Neither the file's content nor a duplicated token is quoted.
  with pytest.raises(sec.SecurityConfigError) as info:
    sec.ServerSecurity(tokens_file=str(tmp_path / "dup.json"), allow_insecure=True)
  assert "tok123" not in str(info.value)


def test_an_unreadable_file_is_named(tmp_path):
  folder = tmp_path / "a_folder.json"  # open() fails on it even for root (a chmod 0 file would not)
  folder.mkdir()
  with pytest.raises(sec.SecurityConfigError, match=r"tokens_file.*cannot read .*a_folder\.json"):
    sec.ServerSecurity(tokens_file=str(folder), allow_insecure=True)


def test_client_config_errors_name_the_field(pki, tmp_path):
  cases = [
      (dict(cert_file=pki["client_cert"], ca_file=pki["ca_cert"]),
       r"cert_file \(--tls_client_cert\) is set but .*key_file \(--tls_client_key\)"),
      (dict(cert_file=pki["client_cert"], key_file=pki["client_key"]),
       r"cert_file \(--tls_client_cert\) needs TLS: set .*ca_file \(--tls_ca\)"),
      (dict(ca_file=str(tmp_path / "missing.pem")), r"ca_file \(--tls_ca\): no such file"),
      (dict(ca_file=pki["ca_cert"], cert_file=pki["client_cert"], key_file=pki["server_key"]),
       r"key_file \(--tls_client_key\): .* is not the key of the certificate"),
      (dict(token="two words", allow_insecure=True), r"token \(--auth_token_file\)"),
      (dict(server_name_override="x", allow_insecure=True), r"server_name_override needs TLS"),
  ]
  for kwargs, message in cases:
    with pytest.raises(sec.SecurityConfigError, match=message):
      sec.ClientSecurity(**kwargs)
  with pytest.raises(sec.SecurityConfigError, match=r"--auth_token_file.*blank\.token' is empty"):
    sec.read_token_file(_write(tmp_path, "blank.token", "\n"))
  assert sec.read_token_file(_write(tmp_path, "ok.token", "abc123\n")) == "abc123"


# -- wiring ---------------------------------------------------------------------------------------


def test_the_launchers_define_the_flags_the_errors_name():
  for launcher, names in (("verifier.py", sec.SERVER_FLAGS), ("drafter.py", sec.CLIENT_FLAGS)):
    text = open(os.path.join(REPO_ROOT, "launch", launcher)).read()
    text += open(os.path.join(REPO_ROOT, "launch", "serving_flags.py")).read()
    for flag in names.values():
      assert f'"{flag[2:]}"' in text, (launcher, flag)


def test_local_cluster_writes_mutual_tls_and_a_token_per_drafter(tmp_path):
  server_flags, drafter_flags = local._security_flags(str(tmp_path), 2, insecure=False)

  def values(flags):
    return dict(flag[2:].split("=", 1) for flag in flags)

  server = values(server_flags)
  server_security = sec.ServerSecurity(cert_file=server["tls_cert"], key_file=server["tls_key"],
                                       client_ca_file=server["tls_client_ca"],
                                       tokens_file=server["auth_tokens"])
  assert server_security.mutual_tls and set(server_security.tokens()) == {"edge0", "edge1"}
  for i, flags in enumerate(drafter_flags):
    client = values(flags)
    sec.ClientSecurity(ca_file=client["tls_ca"], cert_file=client["tls_client_cert"],
                       key_file=client["tls_client_key"])
    assert sec.read_token_file(client["auth_token_file"]) == server_security.tokens()[f"edge{i}"]
    assert all(server_security.tokens()[f"edge{i}"] not in flag for flag in flags)
  assert local._security_flags(str(tmp_path), 2, insecure=True) == (
      ["--allow_insecure"], [["--allow_insecure"], ["--allow_insecure"]])


def test_the_launchers_refuse_plaintext_before_loading_anything():
  """No TLS flags and no --allow_insecure: both launchers exit at once with the flag named."""
  children = [subprocess.Popen([sys.executable, "-m", f"launch.{name}"], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for name in ("verifier", "drafter")]
  for child in children:
    output, _ = child.communicate(timeout=120)
    assert child.returncode != 0
    assert "refusing to" in output and "--allow_insecure" in output, output[-2000:]


def test_a_session_of_another_client_is_permission_denied_over_real_tokens(pki):
  """Two authenticated clients on their own channels: edge1 can neither verify nor close
  edge0's session, and edge0's session is untouched by the attempts."""

  async def scenario():
    async with serving(tls_server(pki, tokens_file=pki["tokens"])) as (_, address):
      owner = sec.ClientSecurity(ca_file=pki["ca_cert"], token=token(pki, "edge0"))
      intruder = sec.ClientSecurity(ca_file=pki["ca_cert"], token=token(pki, "edge1"))
      async with sec.open_channel(address, owner) as mine, \
          sec.open_channel(address, intruder) as theirs:
        opened = await open_session(mine)
        stub = specedge_pb2_grpc.VerifierStub(theirs)
        verify = pb.VerifyRequest(session_id=opened.session_id, root_token=opened.first_token,
                                  tokens=[(3 * opened.first_token + 1) % VOCAB], parents=[0])
        for call in (stub.Verify(verify),
                     stub.CloseSession(pb.CloseSessionRequest(session_id=opened.session_id))):
          error = await status_of(call)
          assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
        answer = await specedge_pb2_grpc.VerifierStub(mine).Verify(verify)
        assert list(answer.accepted_tokens) == list(verify.tokens)

  run(scenario())
