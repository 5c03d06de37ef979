"""The PyTorch SpecExec reference emits exactly HF greedy's (and our engine's) tokens, and the
peer benchmark runs end to end on tiny random models with sane figures."""

import dataclasses
import io
import json
import math

import numpy as np
import pytest
import torch
from rich.console import Console

from specedge_jax import engine as E
from specedge_jax.bench import peers as peer_bench
from specedge_jax.bench import torch_specexec as torch_reference
from specedge_jax.data import tokenizers
from specedge_jax.data.assets import DEFAULT_TARGET_DIR
from specedge_jax.testing.checkpoints import make_hf_model

VOCAB = 97
MAX_NEW = 16
TREE = E.TreeParams(max_n_beams=4, max_beam_len=3, max_branch_width=3, max_budget=8)
PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38], [26], [43, 38, 32, 79, 50, 28, 84]]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """Tiny models gain nothing from intra-op threads, and on a loaded CPU each op would wait at
  an OpenMP barrier for unscheduled threads (hundreds of ms). The setting is process-wide."""
  previous = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
  """(target dir, draft dir, same-as-target draft dir): HF folders of a tiny Qwen3 whose head is
  sharpened (peaked next-token distributions, as in a trained model), a draft that is the target
  plus noise (agrees often, not always), and an exact copy (accepts full paths)."""
  target = make_hf_model("qwen3", seed=0, vocab_size=VOCAB)
  with torch.no_grad():
    target.lm_head.weight.mul_(20.0)
  draft = make_hf_model("qwen3", seed=0, vocab_size=VOCAB)
  draft.load_state_dict(target.state_dict())
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for param in draft.parameters():
      param.add_(0.02 * torch.randn(param.shape, generator=generator))
  folders = []
  for name, model in (("target", target), ("draft", draft), ("copy", target)):
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    folders.append(str(folder))
  return tuple(folders)


def _hf(folder):
  return peer_bench.load_torch_model(folder)


def _hf_greedy(model, prompt, max_new_tokens, eos=None):
  input_ids = torch.tensor([prompt])
  with torch.inference_mode():
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0)
  return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def hf_greedy(pair_dirs):
  target = _hf(pair_dirs[0])
  target.generation_config.eos_token_id = None  # the random config must not stop early
  return [_hf_greedy(target, p, MAX_NEW) for p in PROMPTS]


@pytest.mark.parametrize("draft_index", [1, 2], ids=["noisy_draft", "exact_draft"])
def test_torch_reference_equals_hf_greedy(pair_dirs, hf_greedy, draft_index):
  """(Our engine's output is checked against the same reference in the end-to-end test.)"""
  target_dir, draft_dir = pair_dirs[0], pair_dirs[draft_index]
  reference = torch_reference.TorchSpecExec(_hf(target_dir), _hf(draft_dir), TREE)
  outputs = [reference.generate(p, MAX_NEW) for p in PROMPTS]
  assert [o.tokens for o in outputs] == hf_greedy

  rounds = [n for o in outputs for n in o.emitted_per_round]
  # Multi-token rounds exercise the cache compaction; an exact draft accepts (almost) full depth.
  assert max(rounds) > 1
  if draft_index == 2:
    assert np.mean(rounds) > 3.0



def test_torch_reference_stops_at_eos_like_hf(pair_dirs, hf_greedy):
  target = _hf(pair_dirs[0])
  target.generation_config.eos_token_id = None
  prompt, full = PROMPTS[0], hf_greedy[0]
  eos = full[5]  # stops at its first occurrence, at index <= 5
  expected = full[:full.index(eos) + 1]
  assert _hf_greedy(target, prompt, MAX_NEW, eos=[eos]) == expected
  reference = torch_reference.TorchSpecExec(target, _hf(pair_dirs[1]), TREE, eos_token_ids=[eos])
  assert reference.generate(prompt, MAX_NEW).tokens == expected
  # max_new_tokens counts the first token, as in HF.
  assert reference.generate(prompt, 1).tokens == full[:1]


def test_torch_reference_rejects_bad_input(pair_dirs):
  target = _hf(pair_dirs[0])
  other = make_hf_model("qwen3", seed=3, vocab_size=VOCAB + 1)
  with pytest.raises(ValueError, match="vocabulary"):
    torch_reference.TorchSpecExec(target, other, TREE)
  reference = torch_reference.TorchSpecExec(target, target, TREE)
  with pytest.raises(ValueError, match="non-empty"):
    reference.generate([], 4)
  with pytest.raises(ValueError, match="max_new_tokens"):
    reference.generate([1], 0)


@pytest.mark.slow
def test_peer_bench_end_to_end(pair_dirs, hf_greedy, tmp_path):
  target_dir, draft_dir, _ = pair_dirs
  result = peer_bench.run_peer_bench(target_dir, draft_dir, PROMPTS[:2], max_new_tokens=MAX_NEW,
                                     tree=TREE, eos_token_ids=[], repeats=1, torch_threads=1,
                                     hf_num_assistant_tokens=4)
  assert list(result.methods) == list(peer_bench.METHODS)
  assert all(result.identical_tokens.values()), peer_bench.check_identical(result)
  assert result.identical_texts is None  # no tokenizer in the tiny folders
  assert peer_bench.check_identical(result) == []
  assert result.methods["hf-greedy"].tokens == hf_greedy[:2]
  for name, method in result.methods.items():
    assert method.num_tokens == 2 * MAX_NEW, name
    assert len(method.seconds) == 2 and all(s > 0 for s in method.seconds), name
    assert math.isfinite(method.tokens_per_s) and method.tokens_per_s > 0, name
  # Plain decoding makes one target call per token (plus prefill for ours); speculation fewer.
  assert result.methods["hf-greedy"].tokens_per_target_call == pytest.approx(1.0)
  assert result.methods["ours-target-only"].tokens_per_target_call <= 1.0
  for name in ("ours-speculative", "torch-specexec", "hf-assisted"):
    assert result.methods[name].tokens_per_target_call > 1.0, name
  torch_side = result.methods["torch-specexec"]
  assert 0 < torch_side.target_forward_s + torch_side.draft_forward_s <= torch_side.total_s
  assert result.hf_assistant_settings["num_assistant_tokens"] == 4

  rows = peer_bench.summary_rows(result)
  assert [r[0] for r in rows] == list(peer_bench.METHODS)
  assert all(len(r) == len(peer_bench.SUMMARY_COLUMNS) and r[-1] == "yes" for r in rows)
  json.dumps(result.to_json())
  plot = tmp_path / "peers.png"
  peer_bench.plot_tokens_per_s(result, str(plot))
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # The identity check can fail: one changed token is reported with its position.
  changed = result.methods["hf-assisted"].tokens[1]
  changed[3] = (changed[3] + 1) % VOCAB
  assert peer_bench.first_mismatch(result, "hf-assisted") == (1, 3)
  assert peer_bench.check_identical(result) == [
      "hf-assisted: prompt 1 departs from hf-greedy at token 3"]

def test_peer_bench_rejects_bad_input(pair_dirs):
  target_dir, draft_dir, _ = pair_dirs
  with pytest.raises(ValueError, match="unknown methods"):
    peer_bench.run_peer_bench(target_dir, draft_dir, PROMPTS, max_new_tokens=4,
                              methods=["ours-speculative", "vllm"])
  with pytest.raises(ValueError, match="non-empty"):
    peer_bench.run_peer_bench(target_dir, draft_dir, [[1], []], max_new_tokens=4)


def _hand_made_result() -> peer_bench.PeerBenchResult:
  tokens = [[1, 2, 3, 4], [5, 6, 7, 8]]
  method = lambda name, seconds, calls, **times: peer_bench.MethodResult(
      name, [list(t) for t in tokens], seconds, calls, **times)
  methods = {
      "ours-speculative": method("ours-speculative", [0.5, 0.5], 4, draft_s=0.25, verify_s=0.5),
      "torch-specexec": method("torch-specexec", [1.0, 1.0], 4, target_forward_s=1.0,
                               draft_forward_s=0.5),
      "hf-assisted": method("hf-assisted", [2.0, 2.0], 8, target_forward_s=2.0,
                            draft_forward_s=1.0),
      "hf-greedy": method("hf-greedy", [2.0, 2.0], 8, target_forward_s=3.0),
  }
  return peer_bench.PeerBenchResult(
      methods=methods, identical_tokens={name: True for name in methods}, identical_texts=None,
      num_prompts=2, max_new_tokens=4, tree=TREE, eos_token_ids=(), hf_assistant_settings={})


def test_summary_table_report_plot_and_json(tmp_path):
  result = _hand_made_result()
  table = peer_bench.summary_table(result)
  assert table.title == ("greedy generation, batch 1, 2 prompts x <= 4 tokens, tree (4, 3, 3, 8), "
                         "HF assistant {}")
  assert table.row_count == 4
  console = Console(file=io.StringIO(), width=400)
  peer_bench.print_summary(result, console)
  text = console.file.getvalue()
  for column in peer_bench.SUMMARY_COLUMNS:
    assert column in text
  ours = next(line for line in text.splitlines() if "ours-speculative " in line and "│" in line)
  for cell in ("8.0", "4.00x", "2.00", "draft 25%, verify/decode 50%", "yes"):
    assert cell in ours
  torch_row = next(line for line in text.splitlines() if "torch-specexec " in line and "│" in line)
  assert "target fwd 50%, draft fwd 25%, other 25%" in torch_row
  assert "ours-speculative / torch-specexec: 2.00x tokens/s" in text
  assert "ours-speculative / hf-assisted: 4.00x tokens/s" in text
  assert "MISMATCH" not in text

  changed = dataclasses.replace(result.methods["torch-specexec"], tokens=[[1, 2, 3, 4], [5, 0]])
  result.methods["torch-specexec"] = changed
  console = Console(file=io.StringIO(), width=400)
  peer_bench.print_summary(result, console)
  assert "MISMATCH torch-specexec: prompt 1 departs from hf-greedy at token 1" in (
      console.file.getvalue())

  path = tmp_path / "peers.json"
  peer_bench.write_json(result, str(path))
  data = json.loads(path.read_text())
  assert data["speedups"]["ours-speculative / hf-assisted"] == 4.0
  assert data["methods"]["ours-speculative"]["tokens_per_s"] == 8.0
  assert data["tree"]["max_budget"] == 8 and data["num_prompts"] == 2
  plot = tmp_path / "peers.png"
  peer_bench.plot_tokens_per_s(result, str(plot))
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_tokenizer_is_loaded_only_where_one_was_saved(tmp_path):
  assert not tokenizers.has_tokenizer(tmp_path)
  assert peer_bench._load_tokenizer(str(tmp_path)) is None
  (tmp_path / "tokenizer.model").write_bytes(b"")
  assert tokenizers.has_tokenizer(tmp_path)
  assert tokenizers.has_tokenizer(DEFAULT_TARGET_DIR)
  tokenizer = peer_bench._load_tokenizer(DEFAULT_TARGET_DIR)
  assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"
