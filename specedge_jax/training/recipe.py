"""Training the embedded default models: a byte-level BPE tokenizer, a tiny Qwen3 target, and a
draft distilled from it.

No real Qwen checkpoint can be downloaded where this project is developed, yet the main job, the
acceptance tests and the benchmarks need a target/draft pair that really predicts text. This
module makes one from public English text:

1. Corpus: wikitext and oasst from the benchmark folder (oasst's Llama-2 `[INST]` markup is
   rewritten into the Qwen chat template), plus Python's bundled documentation
   (`pydoc_data.topics`). c4, mtbench and specbench are held out: `HELD_OUT_DATASETS` are never
   read here. A fixed fraction of every source's documents is set aside for validation.
2. Tokenizer: byte-level BPE (`tokenizers`) with Qwen's special tokens and a Qwen-style chat
   template, saved so `transformers.AutoTokenizer` loads it.
3. Target: a Qwen3-architecture `Transformer` trained with cross-entropy (optax adamw,
   warmup-cosine), through our own cache-less forward.
4. Draft: a smaller Qwen3 trained on KL to the target's soft labels plus cross-entropy.
5. Export: HF folders (`hf.save_hf` plus the tokenizer files).

A draft variant for an existing target (`RecipeConfig.teacher_dir`, `train_tiny.py --teacher`)
skips steps 2 and 3: the target is loaded from its HF folder and its tokenizer is reused, so the
new draft speaks exactly the target's token ids (drafters of several sizes share one verifier).

Training is resumable: orbax checkpoints hold the parameters, the optimizer state and the step,
and the batch of step `s` is a pure function of (seed, s), so a run killed and resumed computes
the same updates as one that never stopped.

This module owns the whole recipe and the export; the tokenizer, the corpus and the training loop
are `tokenizer.py`, `corpus.py` and `trainer.py`.
It never touches the serving code, the KV cache, or the benchmark prompt sets it holds out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Sequence

from specedge_jax.checkpoints import hf
from specedge_jax.data.tokenizers import load_tokenizer
from specedge_jax.models.model_config import ModelConfig
from specedge_jax.models.transformer import Transformer, count_parameters
from specedge_jax.training import bpe_tokenizer, corpus, trainer


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
  dataset_dir: str
  use_pydoc: bool = True
  validation_fraction: float = 0.05
  vocab_size: int = 4096
  max_position_embeddings: int = 2048
  target_size: trainer.ModelSize = trainer.TARGET_SIZE
  draft_size: trainer.ModelSize = trainer.DRAFT_SIZE
  target_train: trainer.TrainConfig = trainer.TrainConfig(steps=320, peak_learning_rate=3e-3)
  draft_train: trainer.TrainConfig = trainer.TrainConfig(steps=320, peak_learning_rate=3e-3,
                                         distill_weight=0.9)
  export_dtype: str = "fp32"
  # An existing target (HF folder) to distil the draft from: its tokenizer is reused, the target
  # phase is skipped and only the draft is exported. Empty: train both.
  teacher_dir: str = ""


def prepare_data(recipe: RecipeConfig, work_dir: str):
  """Loads and splits the corpus; trains (or reloads) the tokenizer in `work_dir/tokenizer`, or
  takes the teacher's (`recipe.teacher_dir`)."""
  docs = corpus.load_training_documents(recipe.dataset_dir, recipe.use_pydoc)
  seed = recipe.target_train.seed
  train_docs, validation_docs = corpus.split_documents(docs, recipe.validation_fraction, seed)
  tokenizer_dir = os.path.join(work_dir, "tokenizer")
  if recipe.teacher_dir:  # the draft must speak the existing target's ids, never a new set
    tokenizer = load_tokenizer(recipe.teacher_dir)
  elif os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
    tokenizer = load_tokenizer(tokenizer_dir)  # resuming: the checkpoints depend on these ids
  else:
    tokenizer = bpe_tokenizer.train_tokenizer((d.text for d in train_docs), recipe.vocab_size)
    bpe_tokenizer.save_tokenizer(tokenizer, tokenizer_dir)
  return tokenizer, train_docs, validation_docs


def export_model(folder: str, model_config: ModelConfig, model: Transformer, tokenizer,
                 dtype: str = "fp32") -> None:
  """An HF folder: config.json + model.safetensors + tokenizer files."""
  hf.save_hf(folder, model_config, hf.params_of(model), dtype=dtype)
  bpe_tokenizer.save_tokenizer(tokenizer, folder)


def run_recipe(recipe: RecipeConfig, work_dir: str, target_out: str, draft_out: str, *,
               progress: bool = True, stop_after_step: int | None = None,
               echo: Callable[[str], None] = print) -> dict:
  """Tokenizer, target, distilled draft, export. Resumes whatever `work_dir` already holds.

  With `recipe.teacher_dir` only the draft is trained (against that target, with its tokenizer)
  and exported; `target_out` is not written.

  Returns a summary (sizes, token counts, per-phase wall time, final losses) that is also written
  to `work_dir/summary.json`. With `stop_after_step`, a phase stops after that step (a simulated
  kill); later phases do not start and nothing is exported until a later call finishes.
  """
  os.makedirs(work_dir, exist_ok=True)
  started = time.time()
  tokenizer, train_docs, validation_docs = prepare_data(recipe, work_dir)
  train_stream = corpus.encode_documents(tokenizer, train_docs)
  validation_stream = corpus.encode_documents(tokenizer, validation_docs)
  specials = bpe_tokenizer.special_token_ids(tokenizer)
  eos_ids = (specials[bpe_tokenizer.END_OF_TEXT], specials[bpe_tokenizer.IM_END])
  vocab = len(tokenizer)
  target_config = recipe.target_size.config(vocab, eos_ids, recipe.max_position_embeddings)
  draft_config = recipe.draft_size.config(vocab, eos_ids, recipe.max_position_embeddings)
  summary = {
      "documents": {"train": _count_by_source(train_docs),
                    "validation": _count_by_source(validation_docs)},
      "tokens": {"train": int(len(train_stream)), "validation": int(len(validation_stream))},
      "vocab_size": vocab,
      "data_seconds": round(time.time() - started, 1),
  }
  echo(f"corpus: {summary['documents']} tokens: {summary['tokens']} vocab: {vocab}")

  def log_to(path):
    def write(entry):
      with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return write

  results = {}
  teacher = None
  phases = [("target", target_config, recipe.target_train),
            ("draft", draft_config, recipe.draft_train)]
  if recipe.teacher_dir:
    teacher = hf.load_hf_model(recipe.teacher_dir)
    if teacher.config.vocab_size != vocab:
      raise ValueError(f"the teacher {recipe.teacher_dir} has vocab_size "
                       f"{teacher.config.vocab_size}, its tokenizer {vocab} tokens")
    summary["teacher"] = {"dir": recipe.teacher_dir, "parameters": count_parameters(teacher)}
    phases = phases[1:]
  for name, model_config, train_config in phases:
    echo(f"{name}: {count_parameters(model_config)} parameters")
    result = trainer.train_model(
        model_config, train_stream, train_config, os.path.join(work_dir, f"{name}_checkpoints"),
        teacher=teacher if train_config.distill_weight > 0 else None,
        validation_stream=validation_stream, progress=progress, description=name,
        stop_after_step=stop_after_step, on_log=log_to(os.path.join(work_dir, f"{name}_log.jsonl")))
    results[name] = result
    summary[name] = {
        "parameters": count_parameters(result.model),
        "steps_run": result.steps_done, "resumed_from": result.resumed_from,
        "wall_seconds": round(result.wall_seconds, 1),
        "tokens_seen": train_config.steps * train_config.batch_size * train_config.seq_len,
        "final": result.log[-1] if result.log else None,
    }
    teacher = result.model
    if result.steps_done + (result.resumed_from or 0) < train_config.steps:
      echo(f"{name} stopped at step {stop_after_step}; run again to resume")
      break  # a stopped target must not teach the draft
  summary["finished"] = len(results) == len(phases) and (
      results["draft"].steps_done + (results["draft"].resumed_from or 0)
      == recipe.draft_train.steps)
  if summary["finished"]:
    if "target" in results:
      export_model(target_out, target_config, results["target"].model, tokenizer,
                   recipe.export_dtype)
    export_model(draft_out, draft_config, results["draft"].model, tokenizer, recipe.export_dtype)
  summary["total_seconds"] = round(time.time() - started, 1)
  with open(os.path.join(work_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def _count_by_source(docs: Sequence[corpus.Document]) -> dict[str, int]:
  counts: dict[str, int] = {}
  for d in docs:
    counts[d.source] = counts.get(d.source, 0) + 1
  return counts
