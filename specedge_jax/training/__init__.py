"""Training the embedded default models (a tiny Qwen3 target and a distilled draft).

  bpe_tokenizer.py  the byte-level BPE tokenizer with Qwen's special tokens and chat template.
  corpus.py         the documents, the validation split and the deterministic token windows.
  trainer.py        model presets, the optax training step, evaluation, resumable checkpoints.
  recipe.py         the whole recipe: data, tokenizer, target, distilled draft, HF export.
  evaluation.py     agreement and perplexity of a trained pair.

The library never imports this package; `launch/train_tiny.py` and `launch/eval_tiny.py` do.
"""
