"""The training loop of the embedded models: model presets, the optax step, evaluation, and
resumable orbax checkpoints.

A target is trained with cross-entropy; a draft on KL to the target's soft labels plus
cross-entropy (`TrainConfig.distill_weight`). Checkpoints hold the parameters, the optimizer state
and the step, so a killed run resumes exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from specedge_jax.models.model_config import ModelConfig
from specedge_jax.models.transformer import Transformer, causal_mask
from specedge_jax.training import corpus

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
  """Mean next-token cross-entropy (nats) over all non-overlapping corpus.windows of `stream`.

  The last partial batch is padded with copies of its first window, which are then left out, so
  one program shape covers every batch.
  """
  graphdef, state = nnx.split(model)
  all_windows = corpus.windows(stream, seq_len)
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
      batch = jnp.asarray(corpus.batch_for_step(stream, c.seq_len, c.batch_size, step, c.seed))
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
