"""The on-disk prefill store (serving/prefill_store.py): reused after a restart, refused after any
change of its key, robust to corrupt files; with the fake target (the key and reuse logic), the
real target on a tiny random checkpoint (no prompt forward on reuse, outputs exact), and
`serve_verifier` end to end (precompute at start-up, opens hit the seeded cache).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import shutil

import numpy as np
import pytest

from specedge_jax import api
from specedge_jax.serving import prefill_store as ps
from specedge_jax.serving.drafter import EdgeRequest
from specedge_jax.serving.engine_worker import PrefillCache
from specedge_jax.testing import fakes

CONTEXT = ps.ModelContext(model_sha256="m" * 64, chat_template_sha256="t" * 64, reasoning=False,
                          dtype="params as stored, kv cache float32", max_len=256,
                          numerics="cpu, prefill_chunk 64")
PROMPTS = [(3, 1, 4, 1, 5), (9, 2, 6), (5, 3, 5, 8, 9, 7)]


def requests(prompts=PROMPTS, dataset="c4", first_row=0):
  return [EdgeRequest(request_id=f"{dataset}-{first_row + i}", prompt_ids=tuple(p),
                      dataset=dataset) for i, p in enumerate(prompts)]


def fake_precompute(directory, context=CONTEXT, reqs=None):
  """A "server start": a fresh engine and a fresh store object on `directory`."""
  engine = fakes.FakeTargetEngine()
  store = ps.PrefillStore(directory, fakes.FakeSnapshot)
  result = ps.precompute(engine, store, requests() if reqs is None else reqs, context,
                         compile_restores=False)
  return result, engine


# ------------------------------------------------------------------------------------------------
# The key and reuse logic, with the fake target


KEY_CHANGES = {
    "model weights": {"model_sha256": "n" * 64},
    "chat template": {"chat_template_sha256": "u" * 64},
    "reasoning flag": {"reasoning": True},
    "dtype": {"dtype": "params bf16, kv cache bfloat16"},
    "max_len": {"max_len": 512},
    "numerics": {"numerics": "gpu NVIDIA H200, prefill_chunk 64"},
}


def test_fake_store_is_reused_after_a_restart(tmp_path):
  first, engine = fake_precompute(tmp_path)
  assert (first.computed, first.reused) == (3, 0)
  assert engine.opened_prompts == PROMPTS
  again, engine = fake_precompute(tmp_path)
  assert (again.computed, again.reused, again.unreadable) == (0, 3, 0)
  assert engine.opened_prompts == []  # nothing prefilled: every snapshot came from disk
  assert set(again.snapshots) == set(PROMPTS)
  assert all(s.prompt_ids == p for p, s in again.snapshots.items())


@pytest.mark.parametrize("change", sorted(KEY_CHANGES))
def test_fake_store_refuses_every_change_of_the_model_context(tmp_path, change):
  fake_precompute(tmp_path)
  changed = dataclasses.replace(CONTEXT, **KEY_CHANGES[change])
  result, engine = fake_precompute(tmp_path, changed)
  assert (result.computed, result.reused) == (3, 0), change
  assert engine.opened_prompts == PROMPTS
  # Entries of other keys are kept: switching back reuses them, and the new ones too.
  assert fake_precompute(tmp_path)[0].reused == 3
  assert fake_precompute(tmp_path, changed)[0].reused == 3
  assert len(ps.PrefillStore(tmp_path, fakes.FakeSnapshot).entries()) == 6


def test_fake_store_refuses_another_row_dataset_or_prompt(tmp_path):
  fake_precompute(tmp_path)
  other_rows, engine = fake_precompute(tmp_path, reqs=requests(first_row=10))
  assert (other_rows.computed, other_rows.reused) == (3, 0)
  other_set, _ = fake_precompute(tmp_path, reqs=requests(dataset="oasst"))
  assert other_set.computed == 3
  # Same rows, a prompt that changed under one of them (a dataset file or tokenizer changed).
  changed = [PROMPTS[0], (9, 2, 7), PROMPTS[2]]
  result, engine = fake_precompute(tmp_path, reqs=requests(changed))
  assert (result.computed, result.reused) == (1, 2)
  assert engine.opened_prompts == [(9, 2, 7)]


def test_a_prompt_under_two_rows_is_prefilled_once(tmp_path):
  result, engine = fake_precompute(tmp_path, reqs=requests([PROMPTS[0], PROMPTS[0]]))
  assert (result.computed, len(result.snapshots)) == (1, 1)
  assert engine.opened_prompts == [PROMPTS[0]]
  assert fake_precompute(tmp_path, reqs=requests([PROMPTS[0], PROMPTS[0]]))[0].reused == 2


def test_the_seeded_cache_answers_every_precomputed_prompt(tmp_path):
  fake_precompute(tmp_path)
  result, _ = fake_precompute(tmp_path)
  cache = PrefillCache(len(result.snapshots))
  result.seed(cache)
  assert all(cache.get(p) is result.snapshots[p] for p in PROMPTS)
  assert (cache.hits, cache.misses) == (3, 0)


def _entry_files(directory, prompt_index=0):
  key = ps.PrefillKey.of(CONTEXT, "c4", prompt_index, PROMPTS[prompt_index])
  return ps.PrefillStore(directory, fakes.FakeSnapshot).paths(key)


def _write(path, data: str | bytes):
  with open(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_last_data_byte(path):
  # The member's data precedes the zip's central directory; a flip there fails its CRC-32.
  with open(path, "rb") as f:
    data = bytearray(f.read())
  at = data.rfind(b"PK\x01\x02") - 30  # inside the last member's data, before the directory
  data[at] ^= 0xFF
  _write(path, bytes(data))


def _other_key(path):
  with open(path) as f:
    manifest = json.load(f)
  manifest["key"]["row"] = "7"
  _write(path, json.dumps(manifest))


CORRUPTIONS = {
    "truncated arrays": (1, _truncate),
    "flipped byte in the arrays": (1, _flip_last_data_byte),
    "arrays replaced by text": (1, lambda p: _write(p, "not a zip")),
    "truncated manifest": (0, _truncate),
    "manifest of another key": (0, _other_key),
    "manifest of another format": (0, lambda p: _write(p, '{"format": "x"}')),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_entry_is_a_miss_with_a_warning_naming_the_file(tmp_path, caplog, corruption):
  fake_precompute(tmp_path)
  which, corrupt = CORRUPTIONS[corruption]
  path = _entry_files(tmp_path)[which]
  corrupt(path)
  with caplog.at_level(logging.WARNING, logger=ps.__name__):
    result, engine = fake_precompute(tmp_path)
  assert (result.computed, result.reused, result.unreadable) == (1, 2, 1), corruption
  assert engine.opened_prompts == [PROMPTS[0]]
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and path in warnings[0], warnings
  # The precompute rewrote the entry: the next start reuses all three.
  assert fake_precompute(tmp_path)[0].reused == 3


def test_an_interrupted_save_leaves_a_plain_miss(tmp_path):
  fake_precompute(tmp_path)
  os.remove(_entry_files(tmp_path)[0])  # the arrays were written, the manifest was not
  result, _ = fake_precompute(tmp_path)
  assert (result.computed, result.reused, result.unreadable) == (1, 2, 0)


def test_a_store_that_cannot_save_still_serves_from_memory(tmp_path, caplog, monkeypatch):
  def refuse(*args):
    raise OSError("No space left on device")

  monkeypatch.setattr(ps, "_atomic_write", refuse)
  with caplog.at_level(logging.WARNING, logger=ps.__name__):
    result, _ = fake_precompute(tmp_path)
  assert result.computed == 3 and set(result.snapshots) == set(PROMPTS)
  assert sum("could not save" in r.getMessage() for r in caplog.records) == 3


def test_prune_keeps_only_the_given_keys(tmp_path):
  kept, _ = fake_precompute(tmp_path)
  fake_precompute(tmp_path, dataclasses.replace(CONTEXT, max_len=512))
  store = ps.PrefillStore(tmp_path, fakes.FakeSnapshot)
  assert store.prune(kept.keys) == 3
  assert sorted(e["key"]["max_len"] for e in store.entries()) == [256] * 3
  assert fake_precompute(tmp_path)[0].reused == 3


# ------------------------------------------------------------------------------------------------
# The model's content hash


def _fake_hf_folder(path, weights=b"\x01" * 300_000):
  os.makedirs(path, exist_ok=True)
  _write(os.path.join(path, "config.json"), '{"model_type": "qwen3"}')
  _write(os.path.join(path, "model.safetensors"), weights)
  _write(os.path.join(path, "tokenizer.json"), "{}")
  return str(path)


def test_the_model_hash_is_of_the_content_not_the_path(tmp_path, monkeypatch):
  folder = _fake_hf_folder(tmp_path / "a")
  store = ps.PrefillStore(tmp_path / "store", fakes.FakeSnapshot)
  full_hashes = []
  real_file_digest = hashlib.file_digest
  monkeypatch.setattr(hashlib, "file_digest",
                      lambda f, name: full_hashes.append(f.name) or real_file_digest(f, name))
  first = store.model_hash(folder)
  assert len(full_hashes) == 2  # config.json and the weights; the tokenizer is not the model
  assert store.model_hash(folder) == first and len(full_hashes) == 2  # the cache: no re-read
  copy = shutil.copytree(folder, tmp_path / "b")
  assert store.model_hash(copy) == first  # another path, the same bytes
  _write(os.path.join(folder, "tokenizer.json"), '{"changed": 1}')
  assert store.model_hash(folder) == first
  # One byte changed in place, same size, the modification time put back: still seen.
  weights = os.path.join(folder, "model.safetensors")
  stat = os.stat(weights)
  with open(weights, "r+b") as f:
    f.seek(150_001)
    f.write(b"\x02")
  os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  changed = store.model_hash(folder)
  assert changed != first
  assert ps.model_content_hash(folder) == changed  # without any cache, the same answer
  with pytest.raises(ValueError, match="neither"):
    ps.model_content_hash(tmp_path / "store")


def test_an_unreadable_hash_cache_means_a_rehash(tmp_path, caplog):
  folder = _fake_hf_folder(tmp_path / "a")
  store = ps.PrefillStore(tmp_path / "store", fakes.FakeSnapshot)
  first = store.model_hash(folder)
  _write(os.path.join(store.directory, ps.HASH_CACHE_FILE), "{trunc")
  with caplog.at_level(logging.WARNING, logger=ps.__name__):
    assert store.model_hash(folder) == first
  assert any("hash cache" in r.getMessage() for r in caplog.records)


def test_the_chat_template_hash_sees_the_template_text():
  class Tok:
    def __init__(self, template):
      self.chat_template = template

  assert ps.chat_template_hash(Tok("{{ a }}")) != ps.chat_template_hash(Tok("{{ b }}"))
  assert ps.chat_template_hash(Tok(None)) == ps.chat_template_hash(object())
  assert ps.chat_template_hash(Tok({"default": "x"})) != ps.chat_template_hash(Tok("x"))


# ------------------------------------------------------------------------------------------------
# The real target on a tiny random checkpoint


VOCAB, MAX_NEW, MAX_LEN = 64, 12, 96


def _greedy(engine, prompt, snapshot=None):
  if snapshot is None:
    slot, token, finished = engine.open(prompt, api.GREEDY, 0, MAX_NEW)
  else:
    slot, token, finished = engine.open_from_prefill(snapshot, prompt, api.GREEDY, 0, MAX_NEW)
  out = [token]
  while not finished:
    result = engine.decode([slot])[0]
    out += result.emitted
    finished = result.finished
  engine.close(slot)
  return out


class _Start:
  """A verifier start on the real engine: the model loaded from disk, a fresh engine and store."""

  def __init__(self, folder, store_dir, *, dtype="", max_len=MAX_LEN):
    from specedge_jax import engine as E  # pylint: disable=g-import-not-at-top
    from specedge_jax.checkpoints import orbax_io  # pylint: disable=g-import-not-at-top
    from specedge_jax.engine import prefix_cache  # pylint: disable=g-import-not-at-top

    self.engine = E.TargetEngine(orbax_io.load_model(folder, dtype or None), num_slots=2,
                                 max_len=max_len, max_tree_nodes=9, max_batch_size=2)
    self.store = ps.PrefillStore(store_dir, prefix_cache.PrefillSnapshot)
    # As runners.serve_verifier names them.
    self.context = ps.ModelContext(
        model_sha256=self.store.model_hash(folder),
        chat_template_sha256=ps.chat_template_hash(None), reasoning=False,
        dtype=f"params {dtype or 'as stored'}, kv cache {self.engine.cache.k.dtype}",
        max_len=max_len,
        numerics=ps.numerics_tag("cpu", "prefill_chunk 64"))

  def precompute(self, reqs, **context_changes):
    context = dataclasses.replace(self.context, **context_changes)
    return ps.precompute(self.engine, self.store, reqs, context, compile_restores=False)


def _save_target(folder, seed):
  from specedge_jax.checkpoints import hf  # pylint: disable=g-import-not-at-top
  from specedge_jax.testing import tiny_models  # pylint: disable=g-import-not-at-top

  target, _ = tiny_models.make_pair(VOCAB, seed=seed)
  hf.save_hf(str(folder), target.config, hf.params_of(target))


@pytest.fixture
def real_setup(tmp_path, monkeypatch):
  """(checkpoint folder, store folder, prompts, the list of prefill forwards the engines run)."""
  from specedge_jax.engine import prefill as prefill_lib  # pylint: disable=g-import-not-at-top
  from specedge_jax.testing import tiny_models  # pylint: disable=g-import-not-at-top

  folder, store_dir = tmp_path / "target", tmp_path / "store"
  _save_target(folder, seed=0)
  # Every chunked prefill the engine runs, as (tokens, first row): a prompt forward starts at
  # row 0, a restore forwards only the last prompt token, after the snapshot's rows.
  forwards: list[tuple[int, int]] = []
  real_prefill = prefill_lib.prefill
  monkeypatch.setattr(prefill_lib, "prefill", lambda graphdef, state, cache, slot, tokens, start,
                      *rest: forwards.append((len(tokens), int(start))) or
                      real_prefill(graphdef, state, cache, slot, tokens, start, *rest))
  prompts = [tuple(p) for p in tiny_models.prompts(3, VOCAB, seed=5, min_len=2, max_len=30)]
  return folder, store_dir, prompts, forwards


@pytest.mark.slow  # the fake-engine tests above hold the reuse logic in the inner loop
def test_real_engine_reuses_after_a_restart_with_no_forward_and_exact_outputs(real_setup):
  folder, store_dir, prompts, forwards = real_setup
  reqs = requests(prompts)
  first = _Start(folder, store_dir)
  computed = first.precompute(reqs)
  assert (computed.computed, computed.reused) == (3, 0)
  assert sorted(forwards) == sorted((len(p), 0) for p in prompts)

  forwards.clear()
  restarted = _Start(folder, store_dir)  # a new engine on a freshly loaded model, a new store
  reused = restarted.precompute(reqs)
  assert (reused.computed, reused.reused, reused.unreadable) == (0, 3, 0)
  assert forwards == []  # no prefill forward ran for any of them
  for prompt in prompts:
    fresh, loaded = computed.snapshots[prompt], reused.snapshots[prompt]
    assert loaded.k.dtype == fresh.k.dtype and np.array_equal(loaded.k, fresh.k)
    assert np.array_equal(loaded.v, fresh.v)
    from_store = _greedy(restarted.engine, prompt, loaded)
    assert forwards[-1] == (1, len(prompt) - 1)  # the restore forwarded the last token only
    assert from_store == _greedy(restarted.engine, prompt)  # a fresh prefill: the same tokens


@pytest.mark.slow
def test_real_engine_recomputes_on_every_change_of_the_key(real_setup):
  folder, store_dir, prompts, forwards = real_setup
  reqs = requests(prompts)
  first = _Start(folder, store_dir)
  assert first.precompute(reqs).computed == 3
  restarted = _Start(folder, store_dir)
  assert restarted.precompute(reqs).reused == 3
  # Every part of the key, changed alone, recomputes all three.
  assert restarted.precompute(reqs, chat_template_sha256="t" * 64).computed == 3
  assert restarted.precompute(reqs, reasoning=True).computed == 3
  assert restarted.precompute(requests(prompts, first_row=3)).computed == 3
  assert _Start(folder, store_dir, max_len=MAX_LEN + 32).precompute(reqs).computed == 3
  bf16 = _Start(folder, store_dir, dtype="bf16")
  assert bf16.context.dtype != first.context.dtype
  assert bf16.precompute(reqs).computed == 3
  bf16_again = _Start(folder, store_dir, dtype="bf16").precompute(reqs)  # bfloat16 rows on disk
  assert bf16_again.reused == 3
  assert all(s.k.dtype.name == "bfloat16" for s in bf16_again.snapshots.values())
  _save_target(folder, seed=1)  # other weights under the same path
  new_weights = _Start(folder, store_dir)
  assert new_weights.context.model_sha256 != first.context.model_sha256
  forwards.clear()
  assert new_weights.precompute(reqs).computed == 3
  assert sorted(forwards) == sorted((len(p), 0) for p in prompts)
  # And the unchanged config still finds its own entries.
  assert _Start(folder, store_dir).precompute(reqs).reused == 3


# ------------------------------------------------------------------------------------------------
# serve_verifier end to end


@pytest.mark.slow
def test_serve_verifier_precomputes_at_start_up_and_reuses_after_a_restart(
    served_pair_dirs, tmp_path, caplog):
  from specedge_jax.measure.events import read_events  # pylint: disable=g-import-not-at-top
  from specedge_jax.serving import runners  # pylint: disable=g-import-not-at-top
  from specedge_jax.testing import live_stack  # pylint: disable=g-import-not-at-top

  config = live_stack.embedded_config(num_drafters=1, requests_per_drafter=2,
                                      simulated_rtt_ms=0.0)
  config = dataclasses.replace(
      config,
      models=dataclasses.replace(config.models, target=served_pair_dirs["target"],
                                 draft=served_pair_dirs["draft"]),
      server=dataclasses.replace(config.server, prefill_precompute=True,
                                 prefill_store_dir=str(tmp_path / "store")),
      workload=dataclasses.replace(config.workload, num_requests=3, max_new_tokens=8))

  async def start(events_path, with_drafter):
    stop, ready = asyncio.Event(), asyncio.get_running_loop().create_future()
    server = asyncio.create_task(runners.serve_verifier(
        config, port=0, events_path=events_path, on_ready=ready.set_result, stop=stop))
    port = await asyncio.wait_for(asyncio.shield(ready), 300)
    outputs = []
    if with_drafter:
      outputs = await runners.run_drafter(config, f"127.0.0.1:{port}")
    stop.set()
    await server
    return outputs

  with caplog.at_level(logging.INFO, logger=ps.__name__):
    asyncio.run(start(None, with_drafter=False))
    events = str(tmp_path / "verifier.jsonl")
    outputs = asyncio.run(start(events, with_drafter=True))
  summaries = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("prefill precompute: 3 prompts")]
  assert len(summaries) == 2, summaries
  assert "0 reused" in summaries[0] and "3 computed" in summaries[0]
  assert "3 reused" in summaries[1] and "0 computed" in summaries[1]
  assert len(outputs) == 3 and all(o.tokens for o in outputs)
  opens = [e for e in read_events([events]) if e.get("op") == "prefill"]
  assert len(opens) == 3 and all(e["prefill_cache_hit"] for e in opens)
