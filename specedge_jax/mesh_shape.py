"""A mesh shape as the verifier's flag and config spell it ('model=4', 'data=2,model=2').

Kept apart from `models/sharding.py`, which places arrays on a mesh, because configs and launchers
check the spelling without loading JAX (tests/test_contract.py keeps the serving contract
JAX-free).
"""

from __future__ import annotations

import re

AXES = ("data", "model")


class MeshError(ValueError):
  """A mesh shape that is malformed, needs more devices than there are, or does not divide the
  model; the message names what."""


def parse_mesh_shape(text: str) -> dict[str, int]:
  """'model=4' or 'data=2,model=2' (or '' for one device) -> {'data': d, 'model': m}."""
  shape = {axis: 1 for axis in AXES}
  for part in filter(None, (p.strip() for p in (text or "").split(","))):
    match = re.fullmatch(r"(\w+)\s*=\s*(\d+)", part)
    if not match or match[1] not in AXES:
      raise MeshError(f"mesh shape entry {part!r}: expected AXIS=SIZE with AXIS one of "
                      f"{', '.join(AXES)} (e.g. 'model=4' or 'data=2,model=2')")
    if int(match[2]) < 1:
      raise MeshError(f"mesh axis {match[1]} must have size >= 1, got {match[2]}")
    shape[match[1]] = int(match[2])
  return shape


