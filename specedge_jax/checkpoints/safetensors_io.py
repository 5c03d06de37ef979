"""safetensors files, streamed: the header read by hand, tensors read into and written from
preallocated buffers.

The format is its documented header (an 8-byte little-endian length, then JSON with each
tensor's dtype, shape and byte offsets) followed by raw data. It is read with plain file reads
straight into the caller's buffer, with `ml_dtypes` for bf16: safetensors' own numpy backend cannot
return bf16, and going through torch would make torch a core dependency. Nothing is memory-mapped:
every page touched through a map stays resident, which would double peak memory during a
conversion. Problems fail with a `CheckpointError` that names the file and tensor.

This module owns the file format only; which tensor is which parameter is `hf.py`'s name map.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, Iterator

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


_SAFETENSORS_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
  """A checkpoint does not match the model: names the offending tensor or file."""



@dataclasses.dataclass(frozen=True)
class TensorEntry:
  """One tensor of a safetensors file, located from the header alone (nothing read yet)."""

  name: str
  path: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # absolute byte offset of the data in `path`
  nbytes: int


def _read_safetensors_header(path: str) -> tuple[dict, int]:
  with open(path, "rb") as f:
    raw_len = f.read(8)
    if len(raw_len) != 8:
      raise CheckpointError(f"{path} is too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", raw_len)
    if header_len > os.path.getsize(path) - 8:
      raise CheckpointError(f"{path} has a header length of {header_len} bytes, longer than "
                            "the file: not a safetensors file, or truncated")
    try:
      header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path} has a malformed safetensors header: {e}") from e
  if not isinstance(header, dict):
    raise CheckpointError(f"{path} has a malformed safetensors header: not a JSON object")
  header.pop("__metadata__", None)
  return header, 8 + header_len


def safetensors_entries(path: str) -> list[TensorEntry]:
  """The tensors of one safetensors file, in file order, validated against the file size."""
  header, data_start = _read_safetensors_header(path)
  file_size = os.path.getsize(path)
  entries = []
  for name, info in header.items():
    try:
      dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointError(f"tensor {name!r} in {path} has a malformed header entry "
                            f"{info!r}") from e
    dtype = SAFETENSORS_DTYPES.get(dtype_name)
    if dtype is None:
      raise CheckpointError(f"tensor {name!r} in {path} has unsupported dtype {dtype_name}")
    dtype = np.dtype(dtype)
    shape = tuple(int(d) for d in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != nbytes or begin < 0 or data_start + end > file_size:
      raise CheckpointError(
          f"tensor {name!r} in {path}: data_offsets [{begin}, {end}) do not hold a {dtype_name} "
          f"tensor of shape {shape} ({nbytes} bytes) inside the {file_size}-byte file")
    entries.append(TensorEntry(name, path, dtype, shape, data_start + begin, nbytes))
  return sorted(entries, key=lambda e: e.offset)  # sequential reads


def read_into(file, entry: TensorEntry, out: np.ndarray) -> None:
  """Reads `entry`'s bytes straight into the C-contiguous array `out` (same size)."""
  view = memoryview(out.reshape(-1).view(np.uint8))
  file.seek(entry.offset)
  done = 0
  while done < entry.nbytes:  # one read() returns at most ~2 GiB on Linux
    n = file.readinto(view[done:])
    if not n:
      raise CheckpointError(f"tensor {entry.name!r}: {entry.path} ended early")
    done += n


def read_tensor(file, entry: TensorEntry) -> np.ndarray:
  """Reads one tensor into a fresh array of its own dtype."""
  out = np.empty(entry.shape, entry.dtype)
  read_into(file, entry, out)
  return out


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, array) for each tensor of a safetensors file, one at a time.

  Tensors are read with plain file reads, not a memory map: pages of a map stay in the process's
  resident set until it is unmapped, so mapping a whole file shows up as a second copy of the
  model in peak RSS. bf16 is read through `ml_dtypes` (safetensors' numpy backend cannot).
  """
  with open(path, "rb", buffering=0) as f:
    for entry in safetensors_entries(path):
      yield entry.name, read_tensor(f, entry)



def write_safetensors(path: str, specs: list[tuple[str, tuple[int, ...], np.dtype]],
                      tensors: Iterator[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> None:
  """Writes a safetensors file tensor by tensor: the header from `specs`, then each array.

  `tensors` yields (name, array) in the order of `specs`; each array is cast to its spec's dtype
  and written before the next is produced, so only one tensor is held at a time (the
  `safetensors` package's writers take the whole dict at once).
  """
  header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
  offset = 0
  for name, shape, dtype in specs:
    dtype = np.dtype(dtype)
    if dtype not in _SAFETENSORS_NAMES:
      raise CheckpointError(f"tensor {name!r}: dtype {dtype} has no safetensors name")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the format pads the header so the data is 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    written = 0
    for (name, shape, dtype), (got_name, array) in zip(specs, tensors, strict=True):
      if got_name != name or tuple(array.shape) != tuple(shape):
        raise CheckpointError(f"tensor {got_name!r} {tuple(array.shape)} arrived where the header "
                              f"promised {name!r} {tuple(shape)}")
      array = np.ascontiguousarray(array, dtype=dtype)
      f.write(array.reshape(-1).view(np.uint8).data)
      written += 1
  if written != len(specs):
    raise CheckpointError(f"{path}: {len(specs)} tensors promised, {written} written")

