"""The speculative core: pure jitted functions on fixed-shape padded buffers, caches donated.

  tree.py      the fixed-capacity, score-sorted speculation tree and its operations.
  draft.py     SpecExec growth (`grow`), proactive planning, re-rooting after a hit.
  verify.py    batched tree verification with in-jit acceptance and row compaction.
  prefill.py   one causal prompt chunk into a slot.
  sampling.py  the per-lane temperature / top-k / top-p sampler.

Nothing here keeps state or decides slots, lengths or EOS: the engines do.
"""
