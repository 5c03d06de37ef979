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

Training is resumable: orbax checkpoints hold the parameters, the optimizer state and the step,
and the batch of step `s` is a pure function of (seed, s), so a run killed and resumed computes
the same updates as one that never stopped.

This module owns the corpus preparation, the tokenizer recipe, the training loop and the export.
It never touches the serving code, the KV cache, or the benchmark prompt sets it holds out.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from specedge_jax.checkpoints import hf
from specedge_jax.data import datasets
from specedge_jax.data.tokenizers import load_tokenizer
from specedge_jax.models.model_config import ModelConfig
from specedge_jax.models.transformer import Transformer, causal_mask, count_parameters

# ------------------------------------------------------------------------------------------------
# Tokenizer

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)  # ids 0, 1, 2 in every tokenizer trained here

# Qwen's `<|im_start|>role\n...<|im_end|>\n` turns, without Qwen's tool-calling branches.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def format_chat(messages: Sequence[tuple[str, str]], add_generation_prompt: bool = False) -> str:
  """The text `CHAT_TEMPLATE` renders for (role, content) pairs; used to build training text."""
  text = "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in messages)
  return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def train_tokenizer(texts: Iterable[str], vocab_size: int):
  """Trains a byte-level BPE tokenizer; returns a `transformers.PreTrainedTokenizerFast`.

  Byte-level means every string encodes (no unknown token) and decoding inverts encoding exactly.
  The special tokens are atomic: BPE never splits or merges across them.
  """
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  minimum = len(SPECIAL_TOKENS) + 256  # the byte alphabet must fit
  if vocab_size <= minimum:
    raise ValueError(f"vocab_size must exceed {minimum} (specials + 256 bytes), got {vocab_size}")
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tokenizer.train_from_iterator(texts, trainer=trainer)
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tokenizer, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
      additional_special_tokens=[IM_START, IM_END], model_max_length=32768,
      clean_up_tokenization_spaces=False)
  fast.chat_template = CHAT_TEMPLATE
  return fast


def save_tokenizer(tokenizer, folder: str) -> None:
  """`save_pretrained`, naming the class every transformers release knows.

  transformers 5 records its new `TokenizersBackend` class, which transformers 4 cannot import;
  `PreTrainedTokenizerFast` loads the same `tokenizer.json` under both.
  """
  tokenizer.save_pretrained(folder)
  config_path = os.path.join(folder, "tokenizer_config.json")
  with open(config_path) as f:
    tokenizer_config = json.load(f)
  tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
  for loading_detail in ("is_local", "local_files_only"):  # left by from_pretrained on a reload
    tokenizer_config.pop(loading_detail, None)
  with open(config_path, "w") as f:
    json.dump(tokenizer_config, f, indent=2)


def special_token_ids(tokenizer) -> dict[str, int]:
  ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
  if any(i is None or i == tokenizer.unk_token_id for i in ids.values()):
    raise ValueError(f"tokenizer lacks one of the special tokens {SPECIAL_TOKENS}: {ids}")
  return ids


# ------------------------------------------------------------------------------------------------
# Corpus

TRAINING_DATASETS = {name: datasets.DATASET_FILES[name] for name in ("wikitext", "oasst")}
# Benchmark sets the trained models are evaluated on: never read for training.
HELD_OUT_DATASETS = ("c4", "mtbench", "specbench")


@dataclasses.dataclass(frozen=True)
class Document:
  source: str  # "wikitext", "oasst" or "pydoc"
  text: str


# The oasst rows open with the stock Llama-2 system prompt (note the file's malformed closing
# `<</SYS>`), and mark user turns `[INST] ... [\INST]` (sometimes `[/INST]`).
_SYSTEM_BLOCK = re.compile(r"<<SYS>>.*?<</SYS>>?", re.DOTALL)
_INST_SPLIT = re.compile(r"\[INST\]|\[[\\/]INST\]")


def llama2_chat_to_messages(text: str) -> list[tuple[str, str]]:
  """Parses one Llama-2 chat transcript into (role, content) turns, dropping the system prompt.

  The stock system prompt is the same boilerplate in every row; keeping it would spend the tiny
  model's capacity on memorizing one paragraph. Empty turns (the unanswered last question leaves
  an empty assistant turn) are dropped.
  """
  text = _SYSTEM_BLOCK.sub("", text)
  pieces = _INST_SPLIT.split(text)
  if len(pieces) < 2:
    raise ValueError(f"no [INST] turn in chat transcript {text[:80]!r}")
  messages = []
  # pieces: [before first [INST], user, assistant, user, assistant, ...]
  for turn, piece in enumerate(pieces[1:]):
    content = piece.strip()
    if content:
      messages.append(("user" if turn % 2 == 0 else "assistant", content))
  return messages


def _wikitext_documents(dataset_dir: str) -> list[Document]:
  return [Document("wikitext", text.strip()) for text in
          datasets.read_index_text_rows(os.path.join(dataset_dir,
                                                     TRAINING_DATASETS["wikitext"]))]


def _oasst_documents(dataset_dir: str) -> list[Document]:
  docs = []
  for text in datasets.read_index_text_rows(os.path.join(dataset_dir,
                                                        TRAINING_DATASETS["oasst"])):
    messages = llama2_chat_to_messages(text)
    if messages:
      docs.append(Document("oasst", format_chat(messages)))
  return docs


def _pydoc_documents() -> list[Document]:
  from pydoc_data import topics  # the stdlib's bundled language reference
  return [Document("pydoc", topics.topics[name].strip()) for name in sorted(topics.topics)]


def load_training_documents(dataset_dir: str, use_pydoc: bool = True) -> list[Document]:
  """The training sources as documents, in a fixed order."""
  docs = _wikitext_documents(dataset_dir) + _oasst_documents(dataset_dir)
  if use_pydoc:
    docs += _pydoc_documents()
  return docs


def split_documents(docs: Sequence[Document], validation_fraction: float,
                    seed: int) -> tuple[list[Document], list[Document]]:
  """Sets aside `validation_fraction` of each source's documents (at least one) for validation."""
  if not 0 < validation_fraction < 1:
    raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
  train, validation = [], []
  for source in sorted({d.source for d in docs}):
    of_source = [d for d in docs if d.source == source]
    order = np.random.default_rng([seed, len(of_source)]).permutation(len(of_source))
    n_val = max(1, round(validation_fraction * len(of_source)))
    held = set(order[:n_val].tolist())
    for i, doc in enumerate(of_source):
      (validation if i in held else train).append(doc)
  return train, validation


def encode_documents(tokenizer, docs: Sequence[Document]) -> np.ndarray:
  """One int32 token stream: each document's tokens followed by `<|endoftext|>`."""
  eos = special_token_ids(tokenizer)[END_OF_TEXT]
  encoded = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
  return np.concatenate([np.asarray(ids + [eos], np.int32) for ids in encoded])


def windows(stream: np.ndarray, seq_len: int, offset: int = 0) -> np.ndarray:
  """Non-overlapping [N, seq_len + 1] training windows (inputs plus the shifted labels)."""
  usable = (len(stream) - offset - 1) // seq_len
  if usable < 1:
    raise ValueError(f"token stream of {len(stream)} tokens is shorter than one window "
                     f"of {seq_len + 1}")
  idx = offset + np.arange(usable)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  return stream[idx]


def batch_for_step(stream: np.ndarray, seq_len: int, batch_size: int, step: int,
                   seed: int) -> np.ndarray:
  """The [batch_size, seq_len + 1] batch of training step `step`: a pure function of its inputs.

  Each epoch cuts the stream into windows at a fresh random offset and shuffles them, so epochs
  see different window boundaries. Being a function of the step alone is what makes resumption
  exact: a resumed run draws the batches the killed run would have drawn.
  """
  n_windows = (len(stream) - seq_len - 1) // seq_len
  if n_windows < batch_size:
    raise ValueError(f"{len(stream)} training tokens give {n_windows} windows of {seq_len}; "
                     f"need at least batch_size={batch_size}")
  per_epoch = n_windows // batch_size
  epoch, index = divmod(step, per_epoch)
  rng = np.random.default_rng([seed, epoch])
  offset = int(rng.integers(seq_len))
  order = rng.permutation(n_windows)[index * batch_size:(index + 1) * batch_size]
  starts = offset + order * seq_len
  return stream[starts[:, None] + np.arange(seq_len + 1)[None, :]]


# ------------------------------------------------------------------------------------------------
# Model presets


@dataclasses.dataclass(frozen=True)
class ModelSize:
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int

  def config(self, vocab_size: int, eos_token_ids: tuple[int, ...],
             max_position_embeddings: int) -> ModelConfig:
    return ModelConfig(
        model_type="qwen3", vocab_size=vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_layers=self.num_layers,
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, qk_norm=True,
        max_position_embeddings=max_position_embeddings, eos_token_ids=eos_token_ids)


TARGET_SIZE = ModelSize(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                        intermediate_size=768)
DRAFT_SIZE = ModelSize(hidden_size=160, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=40,
                       intermediate_size=480)


# ------------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One model's optimisation. `distill_weight` > 0 needs a teacher."""

  steps: int
  batch_size: int = 8
  seq_len: int = 384
  peak_learning_rate: float = 2e-3
  warmup_fraction: float = 0.05
  final_learning_rate_fraction: float = 0.1
  weight_decay: float = 0.05
  grad_clip_norm: float = 1.0
  seed: int = 0
  checkpoint_every: int = 50
  eval_every: int = 100
  distill_weight: float = 0.0  # loss = w * KL(teacher || student) + (1 - w) * cross-entropy
  distill_temperature: float = 1.0

  def __post_init__(self):
    if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
      raise ValueError(f"steps, batch_size must be >= 1 and seq_len >= 2: {self}")
    if not 0.0 <= self.distill_weight <= 1.0:
      raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
    if self.checkpoint_every < 1:
      raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")

  def optimizer(self) -> optax.GradientTransformation:
    return _optimizer_for(self)


@functools.cache
def _optimizer_for(config: TrainConfig) -> optax.GradientTransformation:
  # Cached per config: the transformation is part of the optimizer's graphdef, a static jit
  # argument, so handing back the same object lets runs of one config share a compiled step.
  c = config
  warmup = max(1, int(c.warmup_fraction * c.steps))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.peak_learning_rate, warmup_steps=warmup,
      decay_steps=max(c.steps, warmup + 1),
      end_value=c.peak_learning_rate * c.final_learning_rate_fraction)
  # Norm scales and the embedding are left out of weight decay: decaying an RMSNorm scale
  # towards 0 only fights the optimiser.
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
      lambda path, _: "kernel" in jax.tree_util.keystr(path), params)
  return optax.chain(
      optax.clip_by_global_norm(c.grad_clip_norm),
      optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=c.weight_decay, mask=decay_mask))


def _positions_and_mask(batch_size: int, seq_len: int):
  positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch_size, seq_len))
  mask = causal_mask(jnp.full((batch_size,), seq_len, jnp.int32), seq_len)
  return positions, mask


def _forward(model: Transformer, inputs: jax.Array) -> jax.Array:
  positions, mask = _positions_and_mask(*inputs.shape)
  logits, _ = model(inputs, positions, mask)
  return logits


def _loss_and_metrics(student_logits, labels, teacher_logits, distill_weight, temperature):
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(student_logits, labels).mean()
  metrics = {"cross_entropy": cross_entropy}
  loss = cross_entropy
  if teacher_logits is not None:
    teacher_probs = jax.nn.softmax(teacher_logits / temperature, axis=-1)
    student_log_probs = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    teacher_log_probs = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    # KL(teacher || student), scaled by T^2 so its gradient size does not depend on T.
    kl = (teacher_probs * (teacher_log_probs - student_log_probs)).sum(-1).mean()
    kl = kl * temperature**2
    loss = distill_weight * kl + (1.0 - distill_weight) * cross_entropy
    metrics["kl"] = kl
    metrics["agreement"] = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).mean()
  metrics["loss"] = loss
  return loss, metrics


@functools.partial(jax.jit, static_argnames=("graphdef", "teacher_graphdef", "distill_weight",
                                             "temperature"), donate_argnames=("state",))
def _train_step(graphdef, state, batch, teacher_graphdef, teacher_state, distill_weight,
                temperature):
  """One optimiser step. `state` (model + optimizer) is donated and updated in place.

  The model and optimizer are split outside jit and merged here: a traced state argument instead
  of static module objects keeps one compiled program per architecture.
  """
  model, optimizer = nnx.merge(graphdef, state)
  inputs, labels = batch[:, :-1], batch[:, 1:]
  teacher_logits = None
  if teacher_graphdef is not None:
    teacher = nnx.merge(teacher_graphdef, teacher_state)
    teacher_logits = jax.lax.stop_gradient(_forward(teacher, inputs))

  def loss_fn(model):
    return _loss_and_metrics(_forward(model, inputs), labels, teacher_logits, distill_weight,
                             temperature)

  (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  return nnx.state((model, optimizer)), metrics


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _window_nll(graphdef, state, batch):
  """Summed next-token negative log-likelihood of each window [B] of batch [B, T + 1]."""
  logits = _forward(nnx.merge(graphdef, state), batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).sum(-1)


def evaluate_loss(model: Transformer, stream: np.ndarray, seq_len: int,
                  batch_size: int = 8) -> float:
  """Mean next-token cross-entropy (nats) over all non-overlapping windows of `stream`.

  The last partial batch is padded with copies of its first window, which are then left out, so
  one program shape covers every batch.
  """
  graphdef, state = nnx.split(model)
  all_windows = windows(stream, seq_len)
  total = 0.0
  for start in range(0, len(all_windows), batch_size):
    chunk = all_windows[start:start + batch_size]
    real = len(chunk)
    padded = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - real, axis=0)])
    total += float(_window_nll(graphdef, state, jnp.asarray(padded))[:real].sum())
  return total / (len(all_windows) * seq_len)


@dataclasses.dataclass
class TrainResult:
  model: Transformer
  steps_done: int  # steps run by this call (0 when the checkpoint was already complete)
  resumed_from: int | None  # the checkpoint step this call started from, if any
  wall_seconds: float
  log: list[dict]  # every 10th step: step, loss terms, elapsed_s; validation_loss at evals


def _checkpoint_manager(directory: str, keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def train_model(
    model_config: ModelConfig,
    stream: np.ndarray,
    train_config: TrainConfig,
    checkpoint_dir: str,
    *,
    teacher: Transformer | None = None,
    validation_stream: np.ndarray | None = None,
    progress: bool = True,
    description: str = "train",
    stop_after_step: int | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> TrainResult:
  """Trains a model from scratch, or resumes it from the latest orbax checkpoint in the folder.

  Checkpoints are written every `checkpoint_every` steps and at the end. `stop_after_step` ends
  the loop early after that step (as a kill would, minus the lost work since the last
  checkpoint); tests use it to exercise resumption.
  """
  c = train_config
  if (teacher is None) != (c.distill_weight == 0.0):
    raise ValueError("distill_weight > 0 needs a teacher, and a teacher needs distill_weight > 0")
  if teacher is not None and teacher.config.vocab_size != model_config.vocab_size:
    raise ValueError(f"teacher vocab {teacher.config.vocab_size} != student vocab "
                     f"{model_config.vocab_size}")
  model = Transformer(model_config, rngs=nnx.Rngs(c.seed))
  optimizer = nnx.Optimizer(model, c.optimizer(), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  teacher_graphdef, teacher_state = nnx.split(teacher) if teacher is not None else (None, None)

  manager = _checkpoint_manager(checkpoint_dir)
  start_step = 0
  resumed_from = manager.latest_step()
  if resumed_from is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = manager.restore(resumed_from, args=ocp.args.StandardRestore(abstract))
    start_step = resumed_from
  last_step = c.steps if stop_after_step is None else min(c.steps, stop_after_step)

  log: list[dict] = []
  started = time.time()
  from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
  )
  columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
             TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn())
  with Progress(*columns, disable=not progress, refresh_per_second=1) as bar:
    task = bar.add_task(description, total=c.steps, completed=start_step, status="")
    for step in range(start_step, last_step):
      batch = jnp.asarray(batch_for_step(stream, c.seq_len, c.batch_size, step, c.seed))
      state, metrics = _train_step(graphdef, state, batch, teacher_graphdef, teacher_state,
                                   c.distill_weight, c.distill_temperature)
      done = step + 1
      if done % c.checkpoint_every == 0 or done == c.steps or done == last_step:
        manager.save(done, args=ocp.args.StandardSave(state))
      entry = None
      if done % 10 == 0 or done == last_step:
        entry = {"step": done, **{k: float(v) for k, v in metrics.items()},
                 "elapsed_s": round(time.time() - started, 1)}
      if validation_stream is not None and (done % c.eval_every == 0 or done == c.steps):
        entry = entry or {"step": done, **{k: float(v) for k, v in metrics.items()}}
        current = nnx.merge(graphdef, state)[0]
        entry["validation_loss"] = evaluate_loss(current, validation_stream, c.seq_len,
                                                 c.batch_size)
      if entry is not None:
        log.append(entry)
        if on_log:
          on_log(entry)
        status = " ".join(f"{k}={v:.3f}" for k, v in entry.items()
                          if k in ("loss", "agreement", "validation_loss"))
        bar.update(task, status=status)
      bar.update(task, completed=done)
  manager.wait_until_finished()
  manager.close()
  model, _ = nnx.merge(graphdef, state)
  return TrainResult(model=model, steps_done=max(0, last_step - start_step),
                     resumed_from=resumed_from, wall_seconds=time.time() - started, log=log)


# ------------------------------------------------------------------------------------------------
# The whole recipe


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
  dataset_dir: str
  use_pydoc: bool = True
  validation_fraction: float = 0.05
  vocab_size: int = 4096
  max_position_embeddings: int = 2048
  target_size: ModelSize = TARGET_SIZE
  draft_size: ModelSize = DRAFT_SIZE
  target_train: TrainConfig = TrainConfig(steps=320, peak_learning_rate=3e-3)
  draft_train: TrainConfig = TrainConfig(steps=320, peak_learning_rate=3e-3,
                                         distill_weight=0.9)
  export_dtype: str = "fp32"


def prepare_data(recipe: RecipeConfig, work_dir: str):
  """Loads and splits the corpus; trains (or reloads) the tokenizer in `work_dir/tokenizer`."""
  docs = load_training_documents(recipe.dataset_dir, recipe.use_pydoc)
  seed = recipe.target_train.seed
  train_docs, validation_docs = split_documents(docs, recipe.validation_fraction, seed)
  tokenizer_dir = os.path.join(work_dir, "tokenizer")
  if os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
    tokenizer = load_tokenizer(tokenizer_dir)  # resuming: the checkpoints depend on these ids
  else:
    tokenizer = train_tokenizer((d.text for d in train_docs), recipe.vocab_size)
    save_tokenizer(tokenizer, tokenizer_dir)
  return tokenizer, train_docs, validation_docs


def export_model(folder: str, model_config: ModelConfig, model: Transformer, tokenizer,
                 dtype: str = "fp32") -> None:
  """An HF folder: config.json + model.safetensors + tokenizer files."""
  hf.save_hf(folder, model_config, hf.params_of(model), dtype=dtype)
  save_tokenizer(tokenizer, folder)


def run_recipe(recipe: RecipeConfig, work_dir: str, target_out: str, draft_out: str, *,
               progress: bool = True, stop_after_step: int | None = None,
               echo: Callable[[str], None] = print) -> dict:
  """Tokenizer, target, distilled draft, export. Resumes whatever `work_dir` already holds.

  Returns a summary (sizes, token counts, per-phase wall time, final losses) that is also written
  to `work_dir/summary.json`. With `stop_after_step`, a phase stops after that step (a simulated
  kill); later phases do not start and nothing is exported until a later call finishes.
  """
  os.makedirs(work_dir, exist_ok=True)
  started = time.time()
  tokenizer, train_docs, validation_docs = prepare_data(recipe, work_dir)
  train_stream = encode_documents(tokenizer, train_docs)
  validation_stream = encode_documents(tokenizer, validation_docs)
  specials = special_token_ids(tokenizer)
  eos_ids = (specials[END_OF_TEXT], specials[IM_END])
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
  for name, model_config, train_config in (("target", target_config, recipe.target_train),
                                           ("draft", draft_config, recipe.draft_train)):
    echo(f"{name}: {count_parameters(model_config)} parameters")
    result = train_model(
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
  summary["finished"] = len(results) == 2 and (
      results["draft"].steps_done + (results["draft"].resumed_from or 0)
      == recipe.draft_train.steps)
  if summary["finished"]:
    export_model(target_out, target_config, results["target"].model, tokenizer,
                 recipe.export_dtype)
    export_model(draft_out, draft_config, results["draft"].model, tokenizer, recipe.export_dtype)
  summary["total_seconds"] = round(time.time() - started, 1)
  with open(os.path.join(work_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def _count_by_source(docs: Sequence[Document]) -> dict[str, int]:
  counts: dict[str, int] = {}
  for d in docs:
    counts[d.source] = counts.get(d.source, 0) + 1
  return counts
