"""The wire protocols and their committed generated modules: `specedge.proto` (`specedge.v1`, the
verifier) and `layer_split.proto` (`specedge.layersplit.v1`, the layer-split baseline's tail).

Regenerate with `python -m specedge_jax.serving.proto.codegen` (grpcio-tools, a test extra);
`tests/serving/test_proto.py` checks that regenerating gives byte-identical files.
"""
