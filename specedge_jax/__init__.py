"""specedge-jax: edge-assisted speculative LLM serving (SpecEdge) in JAX/Flax.

The library, one sub-package per layer; data flows one way, launch -> serving -> engine -> spec
-> models, with checkpoints, data and measure beside them:

  api.py        the engine contract (Protocols, wire types, errors); imports no JAX
  shapes.py     the one letter legend for shape comments
  models/       model config, the NNX transformer, the slot KV cache
  checkpoints/  safetensors streaming, the HF name map, orbax
  spec/         pure jitted functions: tree, draft (grow, proactive), verify, prefill, sampling
  engine/       the target and draft engines, the generate loop, prefill snapshots
  serving/      proto, gRPC verifier, edge drafter, baselines, serving config, local cluster
  measure/      events, metrics, report, plots
  data/         benchmark prompt sets, prompts, tokenizers, the embedded assets
  training/     the embedded models' recipe and evaluation
  bench/        benchmark logic (core, backends, peers, convert, sweep, the PyTorch SpecExec)
  testing/      fakes implementing the contract, random HF checkpoints, tiny configs

Nothing in the library imports bench/ or training/ (but bench/ itself), and serving reaches an
engine only through api.py. Importing this package loads nothing.
"""
