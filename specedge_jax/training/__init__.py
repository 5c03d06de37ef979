"""Training the embedded default models (a tiny Qwen3 target and a distilled draft).

  recipe.py      tokenizer training, corpus, the optax/orbax training loop, and the recipe.
  evaluation.py  agreement and perplexity of a trained pair.

The library never imports this package; `launch/train_tiny.py` and `launch/eval_tiny.py` do.
"""
