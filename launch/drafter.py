"""Runs one SpecEdge edge drafter: the draft model, K interleaved requests, one verifier.

  python -m launch.drafter --server=127.0.0.1:50051 --client_index=0 --allow_insecure
  python -m launch.drafter --config=configs/qwen3_14b_1_7b.py --server=SERVER:50051 \
      --client_index=3 --config.edge.num_drafters=8 --stream \
      --tls_ca=ca.pem --auth_token_file=edge3.token [--tls_client_cert=c.pem --tls_client_key=c.key]

  python -m launch.drafter --server=127.0.0.1:50051 --allow_insecure --http_port=8000 \
      [--http_api_keys_file=keys.txt]      # the OpenAI-compatible API, chat page and /metrics

Plaintext needs --allow_insecure. The token is read from a file so that it never shows in `ps`.
The draft model is `models.draft_for(client_index)` of the config (`models.drafts` gives edges
different draft models), or --draft; a verifier whose target has another tokenizer refuses it at
the first open, and the drafter then exits with status 2 and the verifier's message.

Without --http_port: serves share `client_index` of `edge.num_drafters` of the workload
(round-robin) and exits, with status 1 if any request failed. With --http_port: serves
`POST /v1/completions`, `POST /v1/chat/completions` (streaming as server-sent events, one event
per verification round), `GET /v1/models`, the chat page at `/` and Prometheus metrics at
`/metrics` until SIGINT/SIGTERM (serving/http_api.py).
"""

import asyncio
import dataclasses
import logging
import os
import sys

from absl import app, flags

from launch import serving_flags
from specedge_jax.serving import drafter, runners, security

_SERVER = flags.DEFINE_string("server", "127.0.0.1:50051", "The verifier's host:port.")
_CLIENT_INDEX = flags.DEFINE_integer("client_index", 0, "This drafter's share of the workload.")
_DRAFT = flags.DEFINE_string("draft", "", "This drafter's draft model (HF folder or orbax dir); "
                             "default: the config's models.draft_for(client_index).")
_STREAM = flags.DEFINE_bool("stream", False, "Print tokens as they are accepted.")
_TLS_CA = flags.DEFINE_string("tls_ca", "", "The CA that signed the verifier's certificate "
                              "(PEM); set = TLS.")
_TLS_CLIENT_CERT = flags.DEFINE_string("tls_client_cert", "", "This edge's certificate, for a "
                                       "mutual-TLS verifier (PEM).")
_TLS_CLIENT_KEY = flags.DEFINE_string("tls_client_key", "", "Its private key (PEM).")
_AUTH_TOKEN_FILE = flags.DEFINE_string("auth_token_file", "", "A file holding this edge's "
                                       "bearer token.")
_HTTP_PORT = flags.DEFINE_integer(
    "http_port", None, "Serve the OpenAI-compatible HTTP API on this port (0 picks a free one) "
    "until SIGINT/SIGTERM, instead of replaying the workload.")
_HTTP_HOST = flags.DEFINE_string("http_host", "127.0.0.1", "Interface of the HTTP API.")
_HTTP_PORT_FILE = flags.DEFINE_string("http_port_file", None,
                                      "Write the HTTP API's bound port here once serving.")
_HTTP_API_KEYS_FILE = flags.DEFINE_string(
    "http_api_keys_file", "", "A file of API keys, one per line: HTTP clients must then send "
    "one as 'Authorization: Bearer <key>'. Unset: no key is asked for.")
_SERVED_MODEL_NAME = flags.DEFINE_string(
    "served_model_name", "", "The model id of the HTTP API; default: <config name>-<target "
    "folder name>.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:  # checked before the model loads
    client_security = security.ClientSecurity(
        ca_file=_TLS_CA.value, cert_file=_TLS_CLIENT_CERT.value, key_file=_TLS_CLIENT_KEY.value,
        token=security.read_token_file(_AUTH_TOKEN_FILE.value) if _AUTH_TOKEN_FILE.value else "",
        allow_insecure=serving_flags.ALLOW_INSECURE.value)
    client_security.require_allowed()
  except security.SecurityConfigError as e:
    raise app.UsageError(str(e)) from None
  api_keys = frozenset()
  if _HTTP_API_KEYS_FILE.value:
    try:
      api_keys = security.read_api_keys_file(_HTTP_API_KEYS_FILE.value)
    except security.SecurityConfigError as e:
      raise app.UsageError(str(e)) from None
  serving_flags.setup_process()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  config = serving_flags.serving_config()
  if _DRAFT.value:  # launch.local names each drafter's model here
    config = dataclasses.replace(config, models=dataclasses.replace(
        config.models, draft=_DRAFT.value, drafts=()))
  if _HTTP_PORT.value is not None:
    asyncio.run(runners.serve_drafter_http(
        config, _SERVER.value, client_index=_CLIENT_INDEX.value,
        http_host=_HTTP_HOST.value, http_port=_HTTP_PORT.value,
        http_port_file=_HTTP_PORT_FILE.value, api_keys=api_keys,
        model_name=_SERVED_MODEL_NAME.value, events_path=serving_flags.EVENT_LOG.value,
        run_id=serving_flags.RUN_ID.value, security=client_security))
    _exit_now(0)
  on_tokens = None
  if _STREAM.value:
    on_tokens = lambda request_id, tokens, finished: print(
        f"{request_id}: {tokens}{' <end>' if finished else ''}", flush=True)
  try:
    outputs = asyncio.run(runners.run_drafter(
        config, _SERVER.value, client_index=_CLIENT_INDEX.value,
        events_path=serving_flags.EVENT_LOG.value, run_id=serving_flags.RUN_ID.value,
        on_tokens=on_tokens, security=client_security))
  except drafter.TokenizerRefused as e:  # a deployment error: one clear line, no traceback
    print(f"the verifier refused this drafter ({config.models.draft_for(_CLIENT_INDEX.value)}): "
          f"{e}", file=sys.stderr)
    _exit_now(2)
  failed = [o for o in outputs if o.finish_reason == "error"]
  for output in outputs:
    print(f"{output.request_id}: {len(output.tokens)} tokens in {output.steps} steps "
          f"({output.finish_reason}{': ' + output.error if output.error else ''})")
  _exit_now(1 if failed else 0)


def _exit_now(status: int) -> None:
  """Leaves without the interpreter's teardown once everything is closed: torch's C++ static
  destructors (torch comes with transformers' tokenizer) cost ~1-2 s of CPU that the other
  processes of a local run wait for (as in launch/verifier.py)."""
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main)
