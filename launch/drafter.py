"""Runs one SpecEdge edge drafter: the draft model, K interleaved requests, one verifier.

  python -m launch.drafter --server=127.0.0.1:50051 --client_index=0 --allow_insecure
  python -m launch.drafter --config=configs/qwen3_14b_1_7b.py --server=SERVER:50051 \
      --client_index=3 --config.edge.num_drafters=8 --stream \
      --tls_ca=ca.pem --auth_token_file=edge3.token [--tls_client_cert=c.pem --tls_client_key=c.key]

Plaintext needs --allow_insecure. The token is read from a file so that it never shows in `ps`.

Serves share `client_index` of `edge.num_drafters` of the workload (round-robin) and exits.
Exits with status 1 if any request failed.
"""

import asyncio
import logging
import sys

from absl import app, flags

from launch import serving_flags
from specedge_jax.serving import runners, security

_SERVER = flags.DEFINE_string("server", "127.0.0.1:50051", "The verifier's host:port.")
_CLIENT_INDEX = flags.DEFINE_integer("client_index", 0, "This drafter's share of the workload.")
_STREAM = flags.DEFINE_bool("stream", False, "Print tokens as they are accepted.")
_TLS_CA = flags.DEFINE_string("tls_ca", "", "The CA that signed the verifier's certificate "
                              "(PEM); set = TLS.")
_TLS_CLIENT_CERT = flags.DEFINE_string("tls_client_cert", "", "This edge's certificate, for a "
                                       "mutual-TLS verifier (PEM).")
_TLS_CLIENT_KEY = flags.DEFINE_string("tls_client_key", "", "Its private key (PEM).")
_AUTH_TOKEN_FILE = flags.DEFINE_string("auth_token_file", "", "A file holding this edge's "
                                       "bearer token.")


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
  serving_flags.setup_process()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  on_tokens = None
  if _STREAM.value:
    on_tokens = lambda request_id, tokens, finished: print(
        f"{request_id}: {tokens}{' <end>' if finished else ''}", flush=True)
  outputs = asyncio.run(runners.run_drafter(
      serving_flags.serving_config(), _SERVER.value, client_index=_CLIENT_INDEX.value,
      events_path=serving_flags.EVENT_LOG.value, run_id=serving_flags.RUN_ID.value,
      on_tokens=on_tokens, security=client_security))
  failed = [o for o in outputs if o.finish_reason == "error"]
  for output in outputs:
    print(f"{output.request_id}: {len(output.tokens)} tokens in {output.steps} steps "
          f"({output.finish_reason}{': ' + output.error if output.error else ''})")
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
