"""Prompt prefill snapshots on disk, and their precompute at verifier start-up.

The reference's `cache_prefill` prefills every dataset prompt once and keeps the key/values in
`~/.cache/specedge/<model>_<dataset>/<row>_key_cache.pt`: keyed on the model's *name*, the dataset
and the row only, so a changed chat template, dtype, max_len or set of weights under the same
name silently reuses stale rows. This store keys an entry on everything that shapes the rows
(`PrefillKey`), and a lookup with any difference is a miss: the stale entry is never read.

What this module owns:
  * `PrefillKey` / `ModelContext`: the key, whose digest names the entry's files;
  * `PrefillStore`: entries on disk (one `.npz` of the snapshot's host arrays plus one small JSON
    manifest each, both written atomically), and the per-file cache of the model's content hash;
  * `model_content_hash`: a SHA-256 over the bytes of the files the loader reads;
  * `precompute` / `precompute_for_serving`: every prompt of a workload loaded from the store or
    prefilled and saved, before the verifier serves; the verifier seeds its in-memory LRU
    (`engine_worker.PrefillCache`) with the result, so opens of those prompts take the hit path.

The store knows the snapshot only through `to_arrays()` / `from_arrays(prompt_ids, arrays)` on
the engine's snapshot type (`engine/prefix_cache.py`, `testing/fakes.py`), and the engine only
through `api.TargetEngineProtocol`, so it loads no JAX.

Layout of a store folder:

    <dir>/model_hashes.json        per file: (size, mtime, ctime, inode, sampled bytes) -> sha256
    <dir>/entries/<digest>.json    manifest: format, the key's fields, the arrays' dtypes/shapes
    <dir>/entries/<digest>.npz     the arrays (uncompressed: key/values are high-entropy floats)

Entries of other keys (another model, dtype or max_len) are kept, not pruned: one folder may
serve several configs, and switching back reuses them; `PrefillStore.prune(keep)` deletes all
but the given keys. An unreadable entry (truncated, corrupt, a manifest that does not match its
key or its arrays) is a miss with a WARNING naming the file, and the precompute overwrites it:
it never stops the server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any, Protocol

import ml_dtypes  # noqa: F401  (registers bfloat16 & co., so np.dtype(name) resolves them)
import numpy as np

from specedge_jax import api
from specedge_jax.serving import workload
from specedge_jax.serving.drafter import EdgeRequest
from specedge_jax.serving.serving_config import ServingConfig

_log = logging.getLogger(__name__)

FORMAT = "specedge_jax/prefill_store"
FORMAT_VERSION = 1
ENTRIES_DIR = "entries"
HASH_CACHE_FILE = "model_hashes.json"
# An orbax checkpoint's files (checkpoints/orbax_io.py), named here to keep this module JAX-free.
ORBAX_METADATA_FILE = "specedge_checkpoint.json"
ORBAX_PARAMS_DIR = "params"

# What an unreadable entry can raise while it is read and checked.
_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile)


def default_store_dir() -> str:
  """`$XDG_CACHE_HOME/specedge_jax/prefill` (`~/.cache/...`), where the reference keeps its own."""
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "specedge_jax", "prefill")


# ------------------------------------------------------------------------------------------------
# The key


def sha256_hex(data: bytes | str) -> str:
  return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def prompt_hash(prompt_ids: Sequence[int]) -> str:
  """SHA-256 of the prompt ids as little-endian int64: the key's last guard (a dataset file or a
  tokenizer changed under the same row)."""
  return sha256_hex(np.asarray(prompt_ids, "<i8").tobytes())


def chat_template_hash(tokenizer) -> str:
  """SHA-256 of the tokenizer's chat template text ('' for none; named templates as sorted JSON).

  Keyed even for the plain sets, which are encoded without it: cheap, and a key that holds more
  than needed can only cost a recompute, never a stale row."""
  template = getattr(tokenizer, "chat_template", None)
  if isinstance(template, dict):
    template = json.dumps(template, sort_keys=True)
  return sha256_hex(template or "")


@dataclasses.dataclass(frozen=True)
class ModelContext:
  """The half of the key that every prompt of one verifier shares.

  model_sha256: `model_content_hash` of the target checkpoint (its bytes, not its path).
  chat_template_sha256: `chat_template_hash` of the tokenizer.
  reasoning: the workload's reasoning flag (`enable_thinking` of templates that read it).
  dtype: parameter and KV-cache dtypes, as the caller names them.
  max_len: cache rows per slot (it shapes the attention the prefill runs, so its numerics).
  numerics: anything else that shapes the rows bit for bit (backend, JAX version, prefill chunk);
    the key holds it so that a reused row equals a fresh prefill exactly.
  """

  model_sha256: str
  chat_template_sha256: str
  reasoning: bool
  dtype: str
  max_len: int
  numerics: str = ""


@dataclasses.dataclass(frozen=True)
class PrefillKey:
  """One entry's key: the model context, the prompt's dataset and row, and the prompt's hash."""

  context: ModelContext
  dataset: str
  row: str
  prompt_sha256: str

  @classmethod
  def of(cls, context: ModelContext, dataset: str, row: str | int,
         prompt_ids: Sequence[int]) -> PrefillKey:
    return cls(context=context, dataset=dataset, row=str(row),
               prompt_sha256=prompt_hash(prompt_ids))

  def fields(self) -> dict[str, Any]:
    """The key as a flat JSON object (what the manifest stores and the digest hashes)."""
    return {**dataclasses.asdict(self.context), "dataset": self.dataset, "row": self.row,
            "prompt_sha256": self.prompt_sha256}

  @property
  def digest(self) -> str:
    """SHA-256 of the canonical JSON of `fields()`, versioned: the entry's file name."""
    canonical = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **self.fields()},
                           sort_keys=True, separators=(",", ":"))
    return sha256_hex(canonical)


def row_of(request: EdgeRequest) -> str:
  """The dataset row of a workload request: its id without the `<dataset>-` prefix
  (`workload.load_requests` names requests `<dataset>-<row>`)."""
  prefix = f"{request.dataset}-"
  rid = request.request_id
  return rid[len(prefix):] if request.dataset and rid.startswith(prefix) else rid


# ------------------------------------------------------------------------------------------------
# The model's content hash


def model_files(path: str | os.PathLike) -> list[str]:
  """The files of a checkpoint that the loader reads (`orbax_io.load_model`): for an orbax
  checkpoint its metadata and every file under params/, for an HF folder config.json and the
  safetensors files (and their index). Tokenizer files are left out: the prompt ids and the chat
  template have their own parts of the key."""
  path = os.fspath(path)
  if os.path.isfile(os.path.join(path, ORBAX_METADATA_FILE)):
    files = [os.path.join(path, ORBAX_METADATA_FILE)]
    for root, dirs, names in os.walk(os.path.join(path, ORBAX_PARAMS_DIR)):
      dirs.sort()
      files += [os.path.join(root, name) for name in sorted(names)]
    return files
  if os.path.isfile(os.path.join(path, "config.json")):
    names = sorted(n for n in os.listdir(path)
                   if n.endswith((".safetensors", ".safetensors.index.json")))
    if not names:
      raise ValueError(f"{path}: an HF folder without safetensors files")
    return [os.path.join(path, "config.json")] + [os.path.join(path, n) for n in names]
  raise ValueError(f"{path} is neither a specedge orbax checkpoint ({ORBAX_METADATA_FILE}) nor an "
                   "HF folder (config.json)")


_SAMPLES, _SAMPLE_BYTES = 16, 64 << 10


def _sampled_digest(f: IO[bytes], size: int) -> str:
  """SHA-256 of 16 blocks of 64 KiB spread over the file (first and last included).

  Part of the hash cache's validity check beside the file's stat: a checkpoint rewritten in
  place within one clock tick keeps its size, mtime, ctime and inode, but not these bytes
  (new weights differ everywhere). About 1 MiB read per file, against GBs for the full hash."""
  h = hashlib.sha256()
  span = max(size - _SAMPLE_BYTES, 0)
  for i in range(_SAMPLES):
    f.seek(span * i // (_SAMPLES - 1))
    h.update(f.read(_SAMPLE_BYTES))
  return h.hexdigest()


def model_content_hash(path: str | os.PathLike, cache_file: str | None = None, *,
                       rehash: bool = False) -> str:
  """SHA-256 over the relative path, size and SHA-256 of each of `model_files(path)`.

  The full hash streams every byte (hashlib, 256 KiB reads: never the whole file in memory).
  With `cache_file`, a file's hash is reused while its size, mtime_ns, ctime_ns, inode and
  sampled bytes (`_sampled_digest`) are unchanged, so a restart does not re-read GBs; `rehash`
  ignores the cache. What the cache cannot see: a same-size rewrite in place within one clock
  tick that leaves all sixteen sampled blocks as they were."""
  path = os.fspath(path)
  cache = {} if rehash or cache_file is None else _read_hash_cache(cache_file)
  total = hashlib.sha256()
  hashed_bytes, started = 0, time.perf_counter()
  for file in model_files(path):
    real = os.path.realpath(file)
    with open(real, "rb") as f:
      st = os.fstat(f.fileno())
      stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
               "inode": st.st_ino, "sampled": _sampled_digest(f, st.st_size)}
      known = cache.get(real)
      if isinstance(known, dict) and {k: known.get(k) for k in stamp} == stamp:
        digest = known["sha256"]
      else:
        f.seek(0)
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        hashed_bytes += st.st_size
        cache[real] = {**stamp, "sha256": digest}
    total.update(f"{os.path.relpath(file, path)}\0{st.st_size}\0{digest}\n".encode())
  if cache_file is not None and hashed_bytes:
    try:
      _atomic_write(cache_file, lambda f: f.write(json.dumps(cache, indent=1).encode()))
    except OSError as e:  # the hash is right; only the next start's shortcut is lost
      _log.warning("prefill store: could not save the hash cache %s: %s", cache_file, e)
  if hashed_bytes:
    _log.info("model content hash of %s: %.1f MB hashed in %.2f s", path, hashed_bytes / 1e6,
              time.perf_counter() - started)
  return total.hexdigest()


def _read_hash_cache(cache_file: str) -> dict[str, Any]:
  if not os.path.exists(cache_file):
    return {}
  try:
    with open(cache_file, "rb") as f:
      cache = json.loads(f.read())
    if not isinstance(cache, dict):
      raise TypeError(f"expected a JSON object, got {type(cache).__name__}")
    return cache
  except (OSError, ValueError, TypeError) as e:
    _log.warning("prefill store: hash cache %s is unreadable (%s); hashing the model again",
                 cache_file, e)
    return {}


# ------------------------------------------------------------------------------------------------
# The store


class UnreadableEntry(ValueError):
  """An entry that exists but cannot be used (truncated, corrupt, inconsistent); names the file."""


class SnapshotType(Protocol):
  """What the store needs of an engine's snapshot class (an `api.PrefillSnapshot` too)."""

  def from_arrays(self, prompt_ids: Sequence[int], arrays: dict[str, np.ndarray]) -> Any: ...


def _atomic_write(path: str, write: Callable[[IO[bytes]], Any]) -> None:
  """Writes `path` through a temp file beside it and `os.replace`: a reader (or a restart after a
  crash) sees the old file or the new one, never half of one."""
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _storable(array: np.ndarray) -> np.ndarray:
  # .npy headers cannot name ml_dtypes' types (bfloat16 is stored as raw void, '|V2'): store
  # their bits as unsigned ints and the dtype's name in the manifest.
  if array.dtype.isbuiltin == 1:
    return array
  return array.view(np.dtype(f"u{array.dtype.itemsize}"))


class PrefillStore:
  """Prefill snapshots on disk, one entry per `PrefillKey`. Several processes may share a
  folder: every write is atomic, and two writers of one key write the same entry."""

  def __init__(self, directory: str | os.PathLike, snapshot_type: SnapshotType):
    self.directory = os.fspath(directory)
    self.snapshot_type = snapshot_type
    os.makedirs(os.path.join(self.directory, ENTRIES_DIR), exist_ok=True)
    self.hits = 0
    self.misses = 0
    self.unreadable = 0
    self.saved = 0

  def paths(self, key: PrefillKey) -> tuple[str, str]:
    """(manifest, arrays) file paths of the key's entry."""
    stem = os.path.join(self.directory, ENTRIES_DIR, key.digest)
    return f"{stem}.json", f"{stem}.npz"

  def model_hash(self, path: str | os.PathLike, *, rehash: bool = False) -> str:
    """`model_content_hash` with this store's per-file hash cache."""
    return model_content_hash(path, os.path.join(self.directory, HASH_CACHE_FILE), rehash=rehash)

  def load(self, key: PrefillKey, prompt_ids: Sequence[int]) -> Any | None:
    """The snapshot saved under `key`, or None: absent, or unreadable (WARNING naming the file)."""
    if key.prompt_sha256 != prompt_hash(prompt_ids):
      raise ValueError("load: the key was made for another prompt")
    manifest_path, arrays_path = self.paths(key)
    if not os.path.exists(manifest_path):  # an .npz alone is a save cut short: a miss
      self.misses += 1
      return None
    try:
      snapshot = self._read(key, prompt_ids, manifest_path, arrays_path)
    except UnreadableEntry as e:
      self.unreadable += 1
      self.misses += 1
      _log.warning("prefill store: unreadable entry: %s; treated as a miss and recomputed", e)
      return None
    self.hits += 1
    return snapshot

  def _read(self, key: PrefillKey, prompt_ids: Sequence[int], manifest_path: str,
            arrays_path: str) -> Any:
    """The entry's snapshot; UnreadableEntry, naming the file, for anything wrong with it."""
    try:
      with open(manifest_path, "rb") as f:
        manifest = json.loads(f.read())
      if not isinstance(manifest, dict):
        raise TypeError("the manifest is not a JSON object")
      if (manifest.get("format"), manifest.get("version")) != (FORMAT, FORMAT_VERSION):
        raise ValueError(f"format {manifest.get('format')!r} version "
                         f"{manifest.get('version')!r}, want {FORMAT!r} {FORMAT_VERSION}")
      if manifest.get("key") != key.fields():
        raise ValueError("the manifest's key is not the key it is filed under")
      specs = manifest.get("arrays")
      if not isinstance(specs, dict):
        raise TypeError("no 'arrays' object")
      specs = {name: (np.dtype(spec["dtype"]), tuple(spec["shape"]))
               for name, spec in specs.items()}
    except _READ_ERRORS as e:
      raise UnreadableEntry(f"{manifest_path}: {type(e).__name__}: {e}") from e
    try:
      arrays = {}
      # Reading each member whole makes zipfile check its CRC-32: a flipped byte is caught here.
      with np.load(arrays_path, allow_pickle=False) as npz:
        if sorted(npz.files) != sorted(specs):
          raise ValueError(f"arrays {sorted(npz.files)}, the manifest lists {sorted(specs)}")
        for name, (dtype, shape) in specs.items():
          stored = npz[name]
          if stored.shape != shape or stored.dtype.itemsize != dtype.itemsize:
            raise ValueError(f"array {name} is {stored.dtype}{list(stored.shape)}, the manifest "
                             f"says {dtype}{list(shape)}")
          arrays[name] = stored.view(dtype)
      return self.snapshot_type.from_arrays(tuple(int(t) for t in prompt_ids), arrays)
    except _READ_ERRORS as e:
      raise UnreadableEntry(f"{arrays_path}: {type(e).__name__}: {e}") from e

  def save(self, key: PrefillKey, snapshot) -> None:
    """Writes the entry: arrays first, then the manifest (an entry exists once its manifest
    does), each atomically."""
    manifest_path, arrays_path = self.paths(key)
    arrays = {name: np.ascontiguousarray(a) for name, a in snapshot.to_arrays().items()}
    storable = {name: _storable(a) for name, a in arrays.items()}
    _atomic_write(arrays_path, lambda f: np.savez(f, allow_pickle=False, **storable))
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "key": key.fields(),
                "arrays": {n: {"dtype": a.dtype.name, "shape": list(a.shape)}
                           for n, a in arrays.items()},
                "nbytes": int(sum(a.nbytes for a in arrays.values())), "saved_at": time.time()}
    _atomic_write(manifest_path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    self.saved += 1

  def entries(self) -> list[dict[str, Any]]:
    """The readable manifests of the folder, any key."""
    found = []
    folder = os.path.join(self.directory, ENTRIES_DIR)
    for name in sorted(os.listdir(folder)):
      if name.endswith(".json"):
        try:
          with open(os.path.join(folder, name), "rb") as f:
            found.append(json.loads(f.read()))
        except (OSError, ValueError):
          continue
    return found

  def prune(self, keep: Iterable[PrefillKey]) -> int:
    """Deletes every entry but those of `keep` (files and temp files of their digests); returns
    how many entries it deleted."""
    kept = {key.digest for key in keep}
    folder = os.path.join(self.directory, ENTRIES_DIR)
    deleted = set()
    for name in os.listdir(folder):
      digest = name.split(".", 1)[0]
      if digest not in kept:
        os.remove(os.path.join(folder, name))
        if name.endswith(".json"):
          deleted.add(digest)
    return len(deleted)


# ------------------------------------------------------------------------------------------------
# Precompute


@dataclasses.dataclass
class Precomputed:
  """What a precompute produced: snapshots by prompt ids (the LRU's key) and how it went."""

  snapshots: dict[tuple[int, ...], Any]
  keys: list[PrefillKey]
  reused: int  # read from the store
  computed: int  # prefilled here (a forward ran) and saved
  unreadable: int  # entries that failed to read, recomputed
  seconds: float

  def seed(self, cache) -> None:
    """Puts every snapshot into an `engine_worker.PrefillCache` (sized to hold them)."""
    for prompt_ids, snapshot in self.snapshots.items():
      cache.put(prompt_ids, snapshot)


def _prefill(engine: api.TargetEngineProtocol, prompt_ids: tuple[int, ...]):
  # A one-token session: the prefill is the snapshot's whole content, the sampled token is not.
  slot, _, _ = engine.open(prompt_ids, api.GREEDY, 0, 1)
  try:
    return engine.export_prefill(slot)
  finally:
    engine.close(slot)


def precompute(engine: api.TargetEngineProtocol, store: PrefillStore,
               requests: Sequence[EdgeRequest], context: ModelContext, *,
               compile_restores: bool = True, log_every_s: float = 5.0) -> Precomputed:
  """Loads every request's prompt snapshot from `store`, or prefills it on `engine` and saves it.

  Run before serving, on the thread that owns the engine then. A prompt that appears under
  several rows is prefilled once and saved under each row's key. With `compile_restores`, one
  snapshot of each size is restored once (and closed), so the first served open of each size
  does not compile the row copy. Progress goes to the log at most every `log_every_s`.
  """
  started = last_log = time.perf_counter()
  unreadable_before = store.unreadable
  snapshots: dict[tuple[int, ...], Any] = {}
  keys: list[PrefillKey] = []
  reused = computed = 0
  for done, request in enumerate(requests, 1):
    prompt = tuple(int(t) for t in request.prompt_ids)
    key = PrefillKey.of(context, request.dataset or "", row_of(request), prompt)
    keys.append(key)
    snapshot = store.load(key, prompt)
    if snapshot is not None:
      reused += 1
    else:
      snapshot = snapshots.get(prompt)
      if snapshot is None:
        snapshot = _prefill(engine, prompt)
        computed += 1
      try:
        store.save(key, snapshot)
      except OSError as e:  # a full or read-only disk costs the next restart, not this server
        _log.warning("prefill store: could not save %s: %s", store.paths(key)[1], e)
    snapshots.setdefault(prompt, snapshot)
    now = time.perf_counter()
    if now - last_log >= log_every_s and done < len(requests):
      last_log = now
      _log.info("prefill precompute: %d/%d prompts (%d reused, %d computed), %.1f s", done,
                len(requests), reused, computed, now - started)
  if compile_restores:
    by_size = {snapshot.nbytes(): (prompt, snapshot) for prompt, snapshot in snapshots.items()}
    for prompt, snapshot in by_size.values():
      slot, _, _ = engine.open_from_prefill(snapshot, prompt, api.GREEDY, 0, 1)
      engine.close(slot)
  result = Precomputed(snapshots=snapshots, keys=keys, reused=reused, computed=computed,
                       unreadable=store.unreadable - unreadable_before,
                       seconds=time.perf_counter() - started)
  _log.info("prefill precompute: %d prompts in %.2f s: %d reused from %s, %d computed and saved"
            "%s; %.1f MB of snapshots", len(requests), result.seconds, reused, store.directory,
            computed, f" ({result.unreadable} unreadable entries recomputed)"
            if result.unreadable else "",
            sum(s.nbytes() for s in snapshots.values()) / 1e6)
  return result


def numerics_tag(*parts: str) -> str:
  """`parts` and the installed jax / jaxlib versions (read from package metadata, without
  importing JAX): a kernel change between versions can change the rows' last bits."""
  versions = []
  for package in ("jax", "jaxlib"):
    try:
      versions.append(f"{package} {importlib.metadata.version(package)}")
    except importlib.metadata.PackageNotFoundError:
      versions.append(f"{package} absent")
  return ", ".join([*parts, *versions])


def precompute_for_serving(config: ServingConfig, engine: api.TargetEngineProtocol,
                           snapshot_type: SnapshotType, *, dtype: str, numerics: str,
                           tokenizer=None) -> Precomputed:
  """`precompute` of the config's workload into `server.prefill_store_dir` (empty: the default
  folder): what `runners.serve_verifier` runs when `server.prefill_precompute` is on."""
  if tokenizer is None:
    tokenizer = workload.load_tokenizer(config.models.tokenizer_dir)
  requests = workload.load_requests(config, tokenizer)
  store = PrefillStore(config.server.prefill_store_dir or default_store_dir(), snapshot_type)
  context = ModelContext(
      model_sha256=store.model_hash(config.models.target),
      chat_template_sha256=chat_template_hash(tokenizer),
      reasoning=config.workload.reasoning,
      dtype=dtype, max_len=config.server.max_len, numerics=numerics)
  return precompute(engine, store, requests, context)
