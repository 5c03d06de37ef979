"""Regenerates the committed protobuf/gRPC modules from `specedge.proto`.

Run from anywhere (needs grpcio-tools, a test dependency):

    python -m specedge_jax.serving.proto.codegen

which runs

    python -m grpc_tools.protoc -I specedge_jax/serving --python_out=specedge_jax/serving \
        --pyi_out=specedge_jax/serving --grpc_python_out=specedge_jax/serving specedge.proto

and then rewrites the generated `import specedge_pb2` in `specedge_pb2_grpc.py` into a
package-relative import, so the modules work from inside the `specedge_jax.serving` package.
`tests/serving/test_proto.py` checks that regenerating gives byte-identical files.

The generated code pins minimum runtime versions (grpcio, protobuf) of the grpcio-tools that made
it; `pyproject.toml` states the same minimums.
"""

from __future__ import annotations

import os
import sys

PROTO_DIR = os.path.dirname(os.path.abspath(__file__))
PROTO_FILE = "specedge.proto"
GENERATED_FILES = ("specedge_pb2.py", "specedge_pb2.pyi", "specedge_pb2_grpc.py")


def regenerate(out_dir: str = PROTO_DIR) -> list[str]:
  """Writes the generated modules into out_dir and returns their paths."""
  from grpc_tools import protoc  # pylint: disable=g-import-not-at-top (a test-only dependency)

  args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
          f"--grpc_python_out={out_dir}", PROTO_FILE]
  if protoc.main(args) != 0:
    raise RuntimeError(f"protoc failed: {' '.join(args)}")
  grpc_module = os.path.join(out_dir, "specedge_pb2_grpc.py")
  with open(grpc_module) as f:
    text = f.read()
  absolute_import = "import specedge_pb2 as specedge__pb2"
  if absolute_import not in text:
    raise RuntimeError(f"{grpc_module}: generated import {absolute_import!r} not found")
  with open(grpc_module, "w") as f:
    f.write(text.replace(absolute_import, "from . import specedge_pb2 as specedge__pb2"))
  return [os.path.join(out_dir, name) for name in GENERATED_FILES]


if __name__ == "__main__":
  for path in regenerate(sys.argv[1] if len(sys.argv) > 1 else PROTO_DIR):
    print(path)
