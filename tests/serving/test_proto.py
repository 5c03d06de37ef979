"""The committed protobuf/gRPC modules are exactly what `specedge.proto` generates."""

import os

import pytest

from specedge_jax.serving.proto import codegen

pytest.importorskip("grpc_tools")


def test_regenerating_gives_the_committed_files(tmp_path):
  for generated in codegen.regenerate(str(tmp_path)):
    name = os.path.basename(generated)
    with open(generated, "rb") as f:
      fresh = f.read()
    with open(os.path.join(codegen.PROTO_DIR, name), "rb") as f:
      committed = f.read()
    assert fresh == committed, (
        f"{name} is stale: run `python -m specedge_jax.serving.proto.codegen` and commit the result")


def test_grpc_module_imports_its_messages_package_relatively():
  # pylint: disable-next=g-import-not-at-top
  from specedge_jax.serving.proto import specedge_pb2, specedge_pb2_grpc

  with open(specedge_pb2_grpc.__file__) as f:
    assert "from . import specedge_pb2 as specedge__pb2" in f.read()
  assert specedge_pb2.DESCRIPTOR.package == "specedge.v1"
  assert set(specedge_pb2.DESCRIPTOR.services_by_name["Verifier"].methods_by_name) == {
      "OpenSession", "Verify", "CloseSession"}
