"""The wire protocol `specedge.v1`: `specedge.proto` and its committed generated modules.

Regenerate with `python -m specedge_jax.serving.proto.codegen` (grpcio-tools, a test extra);
`tests/serving/test_proto.py` checks that regenerating gives byte-identical files.
"""
