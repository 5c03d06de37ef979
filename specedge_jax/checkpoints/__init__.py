"""Checkpoints: reading and writing model parameters.

  safetensors_io.py  the safetensors file format, streamed into preallocated buffers.
  hf.py              the declarative HF tensor-name map, HF folder loading and export.
  orbax_io.py        orbax save/restore of our parameter tree, and `load_model` (HF or orbax).

Every loader fails loudly, naming the tensor, on an unknown, missing or mis-shaped tensor.
"""
