"""The layer-split baseline: the target's first layers on the edge, the rest on the server.

  python -m launch.layer_split --role=tail --split_layer=2 --allow_insecure --port=50061 \
      --event_log=runs/ls/tail.jsonl
  python -m launch.layer_split --role=head --split_layer=2 --wire_dtype=bf16 --allow_insecure \
      --server=127.0.0.1:50061 --client_index=0 --event_log=runs/ls/edge0.jsonl
  python -m launch.layer_split --role=local --wire_dtype=fp16 --out_dir=runs/ls \
      --compare_target_only
  python -m launch.layer_split --role=agreement --split_layers=1,2,3 --wire_dtypes=bf16,fp16,fp32

--role=tail serves layers [L, N) of the target (`specedge.layersplit.v1.LayerSplitTail`) until
SIGINT/SIGTERM; --role=head runs layers [0, L) for share `client_index` of the workload and
exits (status 1 if a request failed); both take the verifier's and drafter's TLS and token flags
(plaintext needs --allow_insecure). --role=local runs the tail and `edge.num_drafters` heads in
this process on loopback (plaintext), writes tail.jsonl and edge<i>.jsonl to --out_dir and prints
the run summary (the same table as launch.report; compare with SpecEdge and the server-only
baselines by pointing launch.report at all the logs). --role=agreement measures, in process,
how far layer-split greedy output follows target-only greedy output for each split layer and
wire dtype (only fp32 is exact: bf16 and fp16 round the hidden states).

--split_layer=-1 (the default) is the reference's split, half of the target's layers.
See specedge_jax/serving/layer_split.py for the protocol, threads and events.
"""

import asyncio
import logging
import os
import sys
import time

from absl import app, flags
from rich.console import Console
from rich.table import Table

from launch import serving_flags
from specedge_jax.engine.layer_split import WIRE_DTYPES
from specedge_jax.measure import metrics, report
from specedge_jax.serving import layer_split, runners, security

_ROLE = flags.DEFINE_enum("role", "local", ["tail", "head", "local", "agreement"],
                          "What this process runs (see the module docstring).")
_SPLIT_LAYER = flags.DEFINE_integer(
    "split_layer", -1, "Layers [0, L) run on the edge, [L, N) on the server; -1: N // 2.")
_WIRE_DTYPE = flags.DEFINE_enum("wire_dtype", "fp32", sorted(WIRE_DTYPES),
                                "dtype of the hidden states on the wire; only fp32 is exact.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "tail: interface to listen on (0.0.0.0: all).")
_PORT = flags.DEFINE_integer("port", 50061, "tail: port; 0 picks a free one.")
_PORT_FILE = flags.DEFINE_string("port_file", None, "tail: write the bound port here.")
_SERVER = flags.DEFINE_string("server", "127.0.0.1:50061", "head: the tail server's host:port.")
_CLIENT_INDEX = flags.DEFINE_integer("client_index", 0, "head: this edge's share of the workload.")
_TLS_CERT = flags.DEFINE_string("tls_cert", "", "tail: TLS server certificate chain (PEM).")
_TLS_KEY = flags.DEFINE_string("tls_key", "", "tail: the certificate's private key (PEM).")
_TLS_CLIENT_CA = flags.DEFINE_string("tls_client_ca", "", "tail: require client certificates "
                                     "signed by this CA (mutual TLS).")
_AUTH_TOKENS = flags.DEFINE_string("auth_tokens", "", 'tail: per-client bearer tokens, a JSON '
                                   'file {"client name": "token", ...}.')
_TLS_CA = flags.DEFINE_string("tls_ca", "", "head: the CA of the server's certificate; set = TLS.")
_TLS_CLIENT_CERT = flags.DEFINE_string("tls_client_cert", "", "head: this edge's certificate.")
_TLS_CLIENT_KEY = flags.DEFINE_string("tls_client_key", "", "head: its private key (PEM).")
_AUTH_TOKEN_FILE = flags.DEFINE_string("auth_token_file", "", "head: a file holding this edge's "
                                       "bearer token.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "local: folder of the event logs; default "
                               "runs/layer_split-<time>.")
_COMPARE = flags.DEFINE_bool("compare_target_only", False, "local: also run target-only "
                             "decoding on the same requests and print the agreement.")
_SPLIT_LAYERS = flags.DEFINE_list("split_layers", [], "agreement: split layers; default: N // 2.")
_WIRE_DTYPES = flags.DEFINE_list("wire_dtypes", ["bf16", "fp16", "fp32"],
                                 "agreement: wire dtypes.")


def _split_layer(value: int):
  return None if value < 0 else value


def _agreement_row(table: Table, split: int, wire: str, agreement) -> None:
  table.add_row(str(split), wire, f"{agreement.identical_requests} / {agreement.requests}",
                f"{agreement.prefix_fraction:.4f}",
                f"{agreement.matching_positions} / {agreement.reference_tokens}")


def _agreement_table() -> Table:
  table = Table(title="Layer split vs target-only greedy")
  for column in ("split layer", "wire", "identical requests", "tokens before divergence",
                 "matching positions"):
    table.add_column(column, justify="right")
  return table


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  serving_flags.setup_process()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  config = serving_flags.serving_config()
  role, split = _ROLE.value, _split_layer(_SPLIT_LAYER.value)
  console = Console()
  if role == "tail":
    try:  # checked before the model loads
      server_security = security.ServerSecurity(
          cert_file=_TLS_CERT.value, key_file=_TLS_KEY.value, client_ca_file=_TLS_CLIENT_CA.value,
          tokens_file=_AUTH_TOKENS.value, allow_insecure=serving_flags.ALLOW_INSECURE.value)
      server_security.require_allowed()
    except security.SecurityConfigError as e:
      raise app.UsageError(str(e)) from None
    asyncio.run(layer_split.serve_tail(
        config, split, host=_HOST.value, port=_PORT.value, port_file=_PORT_FILE.value,
        events_path=serving_flags.EVENT_LOG.value, run_id=serving_flags.RUN_ID.value,
        security=server_security))
  elif role == "head":
    try:
      client_security = security.ClientSecurity(
          ca_file=_TLS_CA.value, cert_file=_TLS_CLIENT_CERT.value, key_file=_TLS_CLIENT_KEY.value,
          token=security.read_token_file(_AUTH_TOKEN_FILE.value) if _AUTH_TOKEN_FILE.value
          else "", allow_insecure=serving_flags.ALLOW_INSECURE.value)
      client_security.require_allowed()
    except security.SecurityConfigError as e:
      raise app.UsageError(str(e)) from None
    outputs = asyncio.run(layer_split.run_head(
        config, split, _WIRE_DTYPE.value, _SERVER.value, client_index=_CLIENT_INDEX.value,
        events_path=serving_flags.EVENT_LOG.value, run_id=serving_flags.RUN_ID.value,
        security=client_security))
    failed = [o.request_id for o in outputs if o.finish_reason == "error"]
    print(f"edge {_CLIENT_INDEX.value}: {len(outputs)} requests, "
          f"{sum(len(o.tokens) for o in outputs)} tokens, {len(failed)} failed", flush=True)
    if failed:
      sys.exit(1)
  elif role == "local":
    out_dir = _OUT_DIR.value or os.path.join("runs", time.strftime("layer_split-%Y%m%d-%H%M%S"))
    model = runners.load_model(config.models.target, config.models.dtype)
    run = layer_split.run_layer_split(config, split, _WIRE_DTYPE.value, events_dir=out_dir,
                                      run_id=serving_flags.RUN_ID.value, model=model)
    _, summaries = metrics.summarize_events(run.events)
    console.print(report.summary_table(summaries))
    console.print("events: " + ", ".join(run.event_paths))
    if _COMPARE.value:
      agreement = layer_split.agreement_with_target_only(config, run.requests, run.outputs,
                                                         model=model)
      table = _agreement_table()
      _agreement_row(table, run.split_layer, _WIRE_DTYPE.value, agreement)
      console.print(table)
  else:
    splits: list[int | None] = [int(s) for s in _SPLIT_LAYERS.value] or [None]
    table = _agreement_table()
    for split_layer, wire, agreement in layer_split.measure_agreement(config, splits,
                                                                       _WIRE_DTYPES.value):
      _agreement_row(table, split_layer, wire, agreement)
    console.print(table)


if __name__ == "__main__":
  app.run(main)
