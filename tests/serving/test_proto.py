"""The committed protobuf/gRPC modules are exactly what the `.proto` files generate."""

import os

import pytest

from specedge_jax.serving.proto import codegen

pytest.importorskip("grpc_tools")


def test_regenerating_gives_the_committed_files(tmp_path):
  generated = codegen.regenerate(str(tmp_path))
  assert sorted(os.path.basename(path) for path in generated) == sorted(codegen.GENERATED_FILES)
  for path in generated:
    name = os.path.basename(path)
    with open(path, "rb") as f:
      fresh = f.read()
    with open(os.path.join(codegen.PROTO_DIR, name), "rb") as f:
      committed = f.read()
    assert fresh == committed, (
        f"{name} is stale: run `python -m specedge_jax.serving.proto.codegen` and commit the "
        "result")


def test_grpc_modules_import_their_messages_package_relatively():
  # pylint: disable-next=g-import-not-at-top
  from specedge_jax.serving.proto import (layer_split_pb2, layer_split_pb2_grpc, specedge_pb2,
                                          specedge_pb2_grpc)

  with open(specedge_pb2_grpc.__file__) as f:
    assert "from . import specedge_pb2 as specedge__pb2" in f.read()
  assert specedge_pb2.DESCRIPTOR.package == "specedge.v1"
  assert set(specedge_pb2.DESCRIPTOR.services_by_name["Verifier"].methods_by_name) == {
      "OpenSession", "Verify", "CloseSession"}
  with open(layer_split_pb2_grpc.__file__) as f:
    assert "from . import layer_split_pb2 as layer__split__pb2" in f.read()
  assert layer_split_pb2.DESCRIPTOR.package == "specedge.layersplit.v1"
  service = layer_split_pb2.DESCRIPTOR.services_by_name["LayerSplitTail"]
  assert set(service.methods_by_name) == {"Open", "Step", "Close"}
  assert service.methods_by_name["Open"].client_streaming  # prompt chunks stream in
