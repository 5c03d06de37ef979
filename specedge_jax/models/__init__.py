"""The model layer: architecture config, the pure NNX decoder, and the slot KV cache.

  model_config.py  `ModelConfig` (Qwen3, Qwen2, Llama) read from HF config dicts, tiny presets.
  transformer.py   the decoder: tokens, positions, cache rows and mask in; logits and cache out.
  kv_cache.py      `KVCache` [L, M, S, K, H] (layers, slots, rows, kv heads, head dim), drop-mode
                   writes, and the one-gather-one-scatter compaction of accepted rows.

Shape letters in comments and einsum strings: see specedge_jax/shapes.py.

The model never builds a mask or picks a row itself: prefill, decode, tree drafting and tree
verification differ only in what they pass.
"""
