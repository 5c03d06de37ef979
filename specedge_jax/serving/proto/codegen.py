"""Regenerates the committed protobuf/gRPC modules from the `.proto` files of this folder.

Run from anywhere (needs grpcio-tools, a test dependency):

    python -m specedge_jax.serving.proto.codegen

which runs, for each file of `PROTO_FILES` (`specedge.proto`, the SpecEdge verifier;
`layer_split.proto`, the layer-split baseline's tail),

    python -m grpc_tools.protoc -I specedge_jax/serving/proto \
        --python_out=specedge_jax/serving/proto --pyi_out=specedge_jax/serving/proto \
        --grpc_python_out=specedge_jax/serving/proto <name>.proto

and then rewrites the generated `import <name>_pb2` in `<name>_pb2_grpc.py` into a
package-relative import, so the modules work from inside the `specedge_jax.serving.proto`
package. `tests/serving/test_proto.py` checks that regenerating gives byte-identical files.

The generated code pins minimum runtime versions (grpcio, protobuf) of the grpcio-tools that made
it; `pyproject.toml` states the same minimums.
"""

from __future__ import annotations

import os
import re
import sys

PROTO_DIR = os.path.dirname(os.path.abspath(__file__))
PROTO_FILES = ("specedge.proto", "layer_split.proto")


def generated_files(proto_file: str) -> tuple[str, str, str]:
  """The modules protoc writes for one `.proto` file: messages, their stubs, the gRPC stubs."""
  stem = proto_file.removesuffix(".proto")
  return (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py")


GENERATED_FILES = tuple(name for proto in PROTO_FILES for name in generated_files(proto))


def _regenerate_one(proto_file: str, out_dir: str) -> list[str]:
  from grpc_tools import protoc  # pylint: disable=g-import-not-at-top (a test-only dependency)

  args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
          f"--grpc_python_out={out_dir}", proto_file]
  if protoc.main(args) != 0:
    raise RuntimeError(f"protoc failed: {' '.join(args)}")
  names = generated_files(proto_file)
  grpc_module = os.path.join(out_dir, names[2])
  with open(grpc_module) as f:
    text = f.read()
  # protoc writes `import <stem>_pb2 as <alias>`; the alias doubles underscores (specedge__pb2).
  messages = names[0].removesuffix(".py")
  absolute_import = re.compile(rf"^import {messages} as (\w+)$", re.MULTILINE)
  if len(absolute_import.findall(text)) != 1:
    raise RuntimeError(f"{grpc_module}: generated import of {messages!r} not found")
  with open(grpc_module, "w") as f:
    f.write(absolute_import.sub(rf"from . import {messages} as \1", text))
  return [os.path.join(out_dir, name) for name in names]


def regenerate(out_dir: str = PROTO_DIR) -> list[str]:
  """Writes the generated modules of every proto file into out_dir and returns their paths."""
  return [path for proto in PROTO_FILES for path in _regenerate_one(proto, out_dir)]


if __name__ == "__main__":
  for path in regenerate(sys.argv[1] if len(sys.argv) > 1 else PROTO_DIR):
    print(path)
