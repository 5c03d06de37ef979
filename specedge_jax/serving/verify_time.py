"""The verifier's forward-time estimator: how long one batched verify will take, before it runs.

What this module owns: `BatchShape` (what a batch is measured by), the linear cost model
`VerifyTimeEstimator` (its fit from the verifier's own measured batches, its seed from a
`launch.bench_core --out_json` verify curve or from defaults, and its file on disk), and the
`VerifyTimeModel` protocol the SLO scheduler (`slo_scheduler.py`) codes against. Pure: numpy and
the standard library, no JAX, no threads; the engine thread is its only caller in the verifier.

The model
---------
    forward_ms = intercept + per_lane * B + per_tree_token * T + per_context_row * C

with B the batch's lanes, T its tree tokens over all lanes (roots included) and C the committed
prefix rows over all lanes. Why these four: on an accelerator the intercept is reading the
weights once per forward (and the launch), the per-lane term is sampling and acceptance per
lane, the tree-token term is the FLOPs, and the context term is attention reading each lane's
KV prefix. Every coefficient is kept >= 0 (a forward never gets cheaper by adding work), which
also keeps the fit sane where the features are nearly collinear (B and T move together).

How it learns
-------------
A ring buffer of the last `window` measured batches is refitted, lazily on the next prediction,
by least squares with a ridge pull towards the seed (`prior_ms`) and the non-negativity above
(one 4x4 solve when no coefficient comes out negative, as usual; else an exact solve over the
16 subsets of free coefficients: four unknowns make that cheaper and simpler than an iterative
NNLS; about 0.1 ms a refit). The ridge acts like about `prior_weight` measurements per
coefficient, so a handful of real batches override the seed, and a coefficient the batches
cannot tell apart from another stays near its seed instead of swinging. A measurement counts at
most `outlier_factor` times the current prediction, so a compile or a paused process (seconds)
cannot wreck the fit, while a seed that is far too low is still corrected geometrically within
a few batches.

Note what the JAX engine does: `TargetEngine.verify` pads every tree to `max_tree_nodes` and the
batch to a bucket, so its forward does not get cheaper when a tree gets smaller. Fitted on its
own batches, the tree-token coefficient then shrinks towards what the padding shows, and the
scheduler stops cutting trees for time; a seed from a verify curve (which compiles one program
per T) says the opposite until the measurements outweigh it.

On disk
-------
`save` writes JSON atomically (a temporary file in the same folder, fsync, `os.replace`), so a
crash leaves the old file or the new one, never half of one. The file holds the measurements
(the data) and, for reading only, the seed and the fit; the seed in use is always the one the
verifier was started with (config), so a new verify curve takes effect at the next start while
the measured batches carry over. A file that is missing starts from the seed. A file that cannot
be read or is not ours is moved aside to `<path>.bad` with a WARNING naming the problem and the
estimator starts from the seed: the file is a cache of measurements, which the verifier
re-learns in a few dozen batches, so refusing to start over it would turn a nuisance into an
outage, and keeping the bad file aside keeps the evidence without it blocking the next save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import tempfile
import time
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

_log = logging.getLogger(__name__)

FILE_FORMAT = "specedge-verify-time"
FILE_VERSION = 1
FEATURES = ("intercept_ms", "per_lane_ms", "per_tree_token_ms", "per_context_row_ms")
# The seed without a verify curve: the embedded pair's CPU verify curve (results/core,
# `launch.bench_core`) fitted to the model, with a small context term. Anything else should be
# seeded from its own curve, or left to learn.
DEFAULT_PRIOR_MS = (2.0, 0.2, 0.09, 0.0005)
# What the ridge measures each coefficient in: a unit of each feature that a typical batch has
# (a forward, a lane, 16 tree tokens, 1024 context rows), so one pull strength fits all four.
_FEATURE_UNITS = np.array([1.0, 1.0, 16.0, 1024.0])
# bench_core's verify curve does not record its prefix; this is its --prefix_len default.
DEFAULT_CURVE_PREFIX_LEN = 128


@dataclasses.dataclass(frozen=True)
class BatchShape:
  """What a verify batch is measured by: lanes, tree tokens and prefix rows over all lanes."""

  batch_size: int
  tree_tokens: int  # over all lanes, roots included
  context_tokens: int  # committed prefix rows over all lanes

  @classmethod
  def of(cls, tree_sizes: Sequence[int], context_lens: Sequence[int]) -> "BatchShape":
    """The shape of lanes with these tree sizes (roots included) and prefix lengths."""
    if len(tree_sizes) != len(context_lens):
      raise ValueError(f"{len(tree_sizes)} tree sizes for {len(context_lens)} context lengths")
    return cls(len(tree_sizes), int(sum(tree_sizes)), int(sum(context_lens)))

  def features(self) -> np.ndarray:
    return np.array([1.0, self.batch_size, self.tree_tokens, self.context_tokens])


class VerifyTimeModel(Protocol):
  """What the SLO scheduler needs of an estimator (tests pass stubs with known outputs)."""

  def predict_s(self, shape: BatchShape) -> float: ...


def _check_coefficients(values: Sequence[float], what: str) -> tuple[float, ...]:
  values = tuple(float(v) for v in values)
  if len(values) != len(FEATURES) or not all(math.isfinite(v) and v >= 0 for v in values):
    raise ValueError(f"{what} must be {len(FEATURES)} finite numbers >= 0 ({', '.join(FEATURES)})"
                     f", got {list(values)}")
  return values


def fit_coefficients(samples: np.ndarray, prior_ms: Sequence[float],
                     prior_weight: float) -> np.ndarray:
  """Non-negative least squares of `samples` ([n, 4]: B, T, C, ms) with a ridge towards
  `prior_ms` of `prior_weight` measurements per coefficient. Returns the 4 coefficients (ms)."""
  prior = np.asarray(prior_ms, float)
  x = np.column_stack([np.ones(len(samples)), samples[:, :3]]) if len(samples) else np.zeros(
      (0, 4))
  y = samples[:, 3] if len(samples) else np.zeros(0)
  # The ridge as extra rows: sqrt(weight) * unit_k * (w_k - prior_k) for each coefficient k.
  ridge = math.sqrt(prior_weight) * np.diag(_FEATURE_UNITS)
  a = np.vstack([x, ridge])
  b = np.concatenate([y, ridge @ prior])
  gram, moment = a.T @ a, a.T @ b
  unconstrained = np.linalg.solve(gram, moment)  # the ridge keeps gram positive definite
  if np.all(unconstrained >= 0):  # the usual case: the constraint does not bind
    return unconstrained
  best, best_loss = np.zeros(4), float(b @ b)  # every coefficient 0: the empty subset
  for size in range(1, 5):
    for free in itertools.combinations(range(4), size):
      index = list(free)
      try:
        solved = np.linalg.solve(gram[np.ix_(index, index)], moment[index])
      except np.linalg.LinAlgError:  # only without a ridge; the other subsets still answer
        continue
      if np.any(solved < 0):
        continue
      w = np.zeros(4)
      w[index] = solved
      loss = float(w @ gram @ w - 2 * moment @ w + b @ b)
      if loss < best_loss - 1e-12:
        best, best_loss = w, loss
  return best


def curve_samples(curve: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                  prefix_len: int | None = None) -> np.ndarray:
  """A verify curve as samples ([n, 4]: B, T, C, ms). `curve` is what `launch.bench_core
  --out_json` writes (its "verify_curve": points of batch_size, tree_tokens per lane with the
  root, median_ms) or that list itself; the prefix, which the file does not record, is
  `prefix_len` (default: a "prefix_len" key of the file, else bench_core's default)."""
  points = curve.get("verify_curve") if isinstance(curve, Mapping) else curve
  if not isinstance(points, Sequence) or not points:
    raise ValueError("a verify curve needs a non-empty 'verify_curve' list of points")
  if prefix_len is None:
    prefix_len = int(curve.get("prefix_len", DEFAULT_CURVE_PREFIX_LEN)
                     if isinstance(curve, Mapping) else DEFAULT_CURVE_PREFIX_LEN)
  rows = []
  for i, point in enumerate(points):
    try:
      batch, tokens, ms = (int(point["batch_size"]), int(point["tree_tokens"]),
                           float(point["median_ms"]))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"verify curve point {i} needs batch_size, tree_tokens and median_ms: "
                       f"{e}") from e
    if batch < 1 or tokens < 1 or not (math.isfinite(ms) and ms > 0):
      raise ValueError(f"verify curve point {i} is not a measurement: {point}")
    rows.append((batch, batch * tokens, batch * prefix_len, ms))
  return np.array(rows, float)


class VerifyTimeEstimator:
  """The linear forward-time model, fitted online (see the module docstring).

  Usage (the engine thread):

      estimator = VerifyTimeEstimator.load(path, prior_ms=VerifyTimeEstimator.prior_from_curve(
          json.load(open("bench_core.json"))))
      seconds = estimator.predict_s(BatchShape.of([33, 20], [300, 410]))
      ... run the batch ...
      estimator.observe(shape, measured_seconds)
      estimator.maybe_save()
  """

  def __init__(self, prior_ms: Sequence[float] = DEFAULT_PRIOR_MS, *, window: int = 512,
               prior_weight: float = 1.0, outlier_factor: float = 4.0, path: str = "",
               save_every_s: float = 10.0):
    if window < 1 or not prior_weight > 0 or not outlier_factor > 1 or not save_every_s >= 0:
      raise ValueError("window must be >= 1, prior_weight > 0, outlier_factor > 1 and "
                       "save_every_s >= 0")
    self.prior_ms = _check_coefficients(prior_ms, "prior_ms")
    self.window = window
    self.prior_weight = prior_weight
    self.outlier_factor = outlier_factor
    self.path = path
    self.save_every_s = save_every_s
    self._samples = np.zeros((0, 4))  # B, T, C, ms; the newest last
    self._coefficients = np.asarray(self.prior_ms)
    self._stale = False  # samples changed since the last fit
    self._last_save = time.monotonic()
    self.observed = 0  # batches observed by this process

  # -- seeding -----------------------------------------------------------------------------------

  @staticmethod
  def prior_from_curve(curve: Mapping[str, Any] | Sequence[Mapping[str, Any]], *,
                       prefix_len: int | None = None,
                       default_ms: Sequence[float] = DEFAULT_PRIOR_MS) -> tuple[float, ...]:
    """Coefficients fitted to a bench_core verify curve (see `curve_samples`). A curve taken at
    one prefix cannot tell the context term from the per-lane one; the pull towards `default_ms`
    settles that."""
    # A light pull: enough to settle the direction the curve cannot see, not to bend the rest.
    fitted = fit_coefficients(curve_samples(curve, prefix_len), default_ms, prior_weight=1e-2)
    return tuple(float(v) for v in fitted)

  @classmethod
  def from_curve_file(cls, curve_path: str, **kwargs) -> "VerifyTimeEstimator":
    """An estimator seeded from a `launch.bench_core --out_json` file; ValueError naming the
    file if it is not one (a seed is config: a bad one is refused, unlike a bad measurements
    file)."""
    try:
      with open(curve_path) as f:
        curve = json.load(f)
      prior = cls.prior_from_curve(curve)
    except (OSError, ValueError) as e:
      raise ValueError(f"verify-time seed {curve_path!r} is not a bench_core verify curve: "
                       f"{e}") from e
    return cls(prior, **kwargs)

  @classmethod
  def from_config(cls, path: str = "", seed: str = "", **kwargs) -> "VerifyTimeEstimator":
    """The verifier's estimator from `server.verify_time_path` (its measurements, '': in memory)
    and `server.verify_time_seed` (a bench_core JSON, '': the defaults)."""
    if seed:
      kwargs["prior_ms"] = cls.from_curve_file(seed).prior_ms
    return cls.load(path, **kwargs)

  # -- the model ---------------------------------------------------------------------------------

  @property
  def coefficients_ms(self) -> tuple[float, ...]:
    """The fitted coefficients, in FEATURES order (ms)."""
    self._refit()
    return tuple(float(v) for v in self._coefficients)

  @property
  def num_samples(self) -> int:
    return len(self._samples)

  def predict_s(self, shape: BatchShape) -> float:
    self._refit()
    return float(self._coefficients @ shape.features()) / 1000.0

  def observe(self, shape: BatchShape, forward_time_s: float) -> None:
    """Adds one measured batch (its forward's wall time) to the fit."""
    if not (math.isfinite(forward_time_s) and forward_time_s >= 0) or shape.batch_size < 1:
      return  # nothing a forward can have measured
    ms = min(1000.0 * forward_time_s, self.outlier_factor * 1000.0 * self.predict_s(shape))
    row = np.array([[shape.batch_size, shape.tree_tokens, shape.context_tokens, ms]], float)
    self._samples = np.concatenate([self._samples, row])[-self.window:]
    self._stale = True
    self.observed += 1

  def refit(self) -> None:
    """Fits the measurements observed since the last fit now (else the next prediction does)."""
    self._refit()

  def _refit(self) -> None:
    if self._stale:
      self._coefficients = fit_coefficients(self._samples, self.prior_ms, self.prior_weight)
      self._stale = False

  # -- on disk -----------------------------------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    return {"format": FILE_FORMAT, "version": FILE_VERSION, "features": list(FEATURES),
            "prior_ms": list(self.prior_ms), "coefficients_ms": list(self.coefficients_ms),
            "samples": self._samples.tolist()}

  def restore(self, data: Mapping[str, Any]) -> None:
    """Takes the measurements of a `to_dict` (the seed stays this estimator's own); ValueError
    naming what is wrong, leaving this estimator as it was."""
    if not isinstance(data, Mapping) or data.get("format") != FILE_FORMAT:
      raise ValueError(f"not a {FILE_FORMAT} file")
    if data.get("version") != FILE_VERSION:
      raise ValueError(f"version {data.get('version')!r}; this verifier reads {FILE_VERSION}")
    if list(data.get("features", ())) != list(FEATURES):
      raise ValueError(f"features {data.get('features')!r}, expected {list(FEATURES)}")
    try:
      samples = np.asarray(data.get("samples", []), float).reshape(-1, 4)
    except (TypeError, ValueError) as e:
      raise ValueError(f"samples must be rows of (batch, tree tokens, context, ms): {e}") from e
    if not np.all(np.isfinite(samples)) or np.any(samples < 0) or np.any(samples[:, 0] < 1):
      raise ValueError("samples must be finite, >= 0, with batch sizes >= 1")
    self._samples = samples[-self.window:]
    self._stale = True

  @classmethod
  def load(cls, path: str, **kwargs) -> "VerifyTimeEstimator":
    """An estimator that saves to `path`, with the measurements found there (see the module
    docstring for a missing or bad file). `kwargs` go to the constructor (the seed among
    them)."""
    estimator = cls(path=path, **kwargs)
    if not path or not os.path.exists(path):
      return estimator
    try:
      with open(path) as f:
        data = json.load(f)
      estimator.restore(data)
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
      aside = f"{path}.bad"
      try:
        os.replace(path, aside)
      except OSError:
        aside = "(could not move it aside)"
      _log.warning("verify-time file %s is unusable (%s); moved to %s, starting from the seed",
                   path, e, aside)
    return estimator

  def save(self, path: str | None = None) -> None:
    """Writes the estimator to `path` (default: its own) atomically; no-op without a path."""
    path = path or self.path
    if not path:
      return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
      with os.fdopen(fd, "w") as f:
        json.dump(self.to_dict(), f)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.unlink(tmp)
      raise
    self._last_save = time.monotonic()

  def maybe_save(self) -> None:
    """Saves when it has a path and `save_every_s` passed since the last save. A failed save is
    logged, not raised: the verifier must keep serving when its disk does not."""
    if self.path and time.monotonic() - self._last_save >= self.save_every_s:
      try:
        self.save()
      except OSError as e:
        self._last_save = time.monotonic()  # retried after the period, not after every batch
        _log.warning("could not save the verify-time file %s: %s", self.path, e)
