"""The XLA-vs-PyTorch benchmark computes the same thing on both sides: its torch tree forward
(4D mask + cache) and our jitted forward agree on every node's logits, and each node's logits
equal a plain forward of its root-to-node path."""

import io
import json

import numpy as np
import pytest
import torch
from rich.console import Console

from specedge_jax.bench import backends as bb
from specedge_jax.testing.checkpoints import save_hf_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("bench_qwen3")
  save_hf_model(folder, "qwen3")
  return str(folder)


def test_random_tree_is_a_tree():
  depth, ancestors = bb.random_tree(np.random.default_rng(0), 12)
  assert depth[0] == 0 and ancestors[0].sum() == 1
  for node in range(1, 12):
    # Ancestors of a node: itself plus one node at each shallower depth.
    assert ancestors[node].sum() == depth[node] + 1
    assert sorted(depth[ancestors[node]]) == list(range(depth[node] + 1))


@pytest.mark.slow
@pytest.mark.parametrize("kind,batch,tree_size", [("verify", 2, 6), ("decode", 2, 1)])
def test_variants_agree_and_match_path_forward(tiny_dir, kind, batch, tree_size):
  config = bb.BenchConfig(prefix_len=5, repeats=2, warmup=1)
  case = bb.Case(kind, batch, tree_size)
  runners = bb.make_runners(tiny_dir, ("jax", "torch-eager-dynamic", "torch-eager-static",
                                       "jax-unstacked"))
  result = bb.run_case(case, runners, config, vocab_size=97)
  for name, variant in result.results.items():
    assert variant.error is None, (name, variant.error)
    assert variant.median_ms > 0
    if name != "jax":
      assert variant.max_abs_logit_diff < bb.LOGIT_ATOL
  # Ground truth for the last lane's deepest node: a plain causal forward of prefix + path.
  inputs = bb.make_inputs(case, config.prefix_len, 97, config.seed)
  jax_logits = bb._to_numpy(runners[0].call())
  lane = batch - 1
  node = int(np.argmax(inputs.depth[lane]))
  path = np.flatnonzero(inputs.ancestors[lane, node])  # ancestors come before descendants
  sequence = np.concatenate([inputs.prefix[lane], inputs.tokens[lane, path]])
  with torch.no_grad():
    expected = runners[1].model(torch.tensor(sequence[None], dtype=torch.long)).logits[0, -1]
  np.testing.assert_allclose(jax_logits[lane, node], expected.numpy(), atol=bb.LOGIT_ATOL)


@pytest.mark.slow
def test_table_plot_and_unknown_variant(tiny_dir, tmp_path):
  with pytest.raises(ValueError, match="unknown variants"):
    bb.make_runners(tiny_dir, ("jax", "tensorflow"))
  result = bb.CaseResult(bb.Case("verify", 1, 32), {
      "jax": bb.VariantResult(2.0, 1.0, 3.0, 0.5, 0.5, None),
      "torch-eager-static": bb.VariantResult(5.0, 4.0, 6.0, 2.0, 0.1, 1e-6),
      "torch-compile": bb.VariantResult(None, None, None, None, None, None,
                                        "BackendCompilerFailed")})
  assert result.ratio("torch-eager-static") == 2.5
  assert result.ratio("torch-eager-static", "min") == 4.0
  assert result.ratio("torch-compile") is None
  assert bb.errors_of([result]) == ["verify B=1 T=32 torch-compile: BackendCompilerFailed"]
  for statistic in ("median", "min"):  # renders a failed variant
    bb.results_table([result], ("jax", "torch-eager-static", "torch-compile"), statistic)
  path = bb.plot_results([result], ("jax", "torch-eager-static", "torch-compile"),
                         str(tmp_path / "plots" / "backends.png"), title="t")
  data = open(path, "rb").read()
  assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_gemm_ceiling_times_both_libraries_on_the_same_product():
  (result,) = bb.time_gemms([(4, 8, 16)], repeats=3)
  assert result.shape == (4, 8, 16) and result.xla_ms > 0 and result.torch_ms > 0
  assert result.max_abs_diff < 1e-4
  assert result.gflops(1.0) == pytest.approx(2 * 4 * 8 * 16 / 1e-3 / 1e9)
  assert bb.parse_gemm_shape("32X256x768") == (32, 256, 768)
  for bad in ("32x256", "32x0x8", "axbxc"):
    with pytest.raises(ValueError, match="MxKxN"):
      bb.parse_gemm_shape(bad)
  bb.gemm_table([result])


def _text(renderable) -> str:
  console = Console(file=io.StringIO(), width=400)
  console.print(renderable)
  return console.file.getvalue()


def _hand_made_case():
  return bb.CaseResult(bb.Case("verify", 1, 32), {
      "jax": bb.VariantResult(2.0, 1.0, 3.0, 0.5, 0.5, None),
      "torch-eager-static": bb.VariantResult(5.0, 4.0, 6.0, 2.0, 0.1, 1e-6),
      "torch-compile": bb.VariantResult(None, None, None, None, None, None,
                                        "BackendCompilerFailed")})


def test_progress_line_tables_title_and_json_show_the_results():
  result = _hand_made_case()
  variants = ("jax", "torch-eager-static", "torch-compile")
  assert bb.case_line(result) == ("verify B=1 T=32: jax 2.00 ms, torch-eager-static 5.00 ms, "
                                  "torch-compile failed")
  median = _text(bb.results_table([result], variants, "median"))
  row = next(line for line in median.splitlines() if "verify B=1 T=32" in line)
  for cell in ("2.00", "5.00", "failed", "2.50", "-", "1.0e-06 ok"):
    assert cell in row
  for column in ("jax ms", "torch-eager-static ms", "x eager-static", "x compile"):
    assert column in median
  minimum = _text(bb.results_table([result], variants, "min"))
  row = next(line for line in minimum.splitlines() if "verify B=1 T=32" in line)
  assert "0.50" in row and "4.00" in row

  gemm = bb.GemmResult((4, 8, 16), 0.5, 0.25, 1e-6)
  gemm_text = _text(bb.gemm_table([gemm]))
  row = next(line for line in gemm_text.splitlines() if "4x8x16" in line)
  for cell in ("0.500", "0.250", "2.00", "1.0e-06"):
    assert cell in row

  environment = {"jax": "0", "load average (1 min)": "0.50"}
  config = bb.BenchConfig(prefix_len=64)
  assert bb.plot_title(config, environment) == (
      "XLA vs PyTorch, prefix 64, library default threads, load 0.50")
  assert bb.plot_title(bb.BenchConfig(torch_threads=1), environment) == (
      "XLA vs PyTorch, prefix 128, 1 thread, load 0.50")

  data = json.loads(json.dumps(bb.results_json(config, environment, [result])))
  assert set(data) == {"config", "environment", "cases"}
  assert data["config"]["prefix_len"] == 64 and data["environment"] == environment
  (case,) = data["cases"]
  assert case["case"] == {"kind": "verify", "batch": 1, "tree_size": 32}
  assert case["results"]["torch-eager-static"]["median_ms"] == 5.0
  assert case["results"]["torch-compile"]["error"] == "BackendCompilerFailed"
  gemms = json.loads(json.dumps(bb.gemms_json([gemm], environment)))
  assert gemms == {"gemms": [{"shape": [4, 8, 16], "xla_ms": 0.5, "torch_ms": 0.25,
                              "max_abs_diff": 1e-6}], "environment": environment}
