"""The conversion benchmark's pieces (`launch/bench_convert.py`): the measured subprocess commands
are valid and point at the moved modules, the memory and latency tables show what was measured,
and a checkpoint under --min_mb is refused before anything is measured."""

import io
import os

import pytest
from rich.console import Console

from specedge_jax.bench import convert as convert_bench


def _text(renderable) -> str:
  console = Console(file=io.StringIO(), width=400)
  console.print(renderable)
  return console.file.getvalue()


def test_memory_commands_are_python_that_measures_the_right_processes():
  commands = convert_bench.memory_commands("py", "/ckpt/hf", "/ckpt/orbax", src_dtype="fp32",
                                           dtype="bf16")
  assert [name for name, _, _ in commands] == [
      "imports only (baseline)", "launch.convert fp32 -> bf16",
      "orbax_io.load_model(orbax dir)", "orbax_io.load_model(HF folder, bf16)"]
  assert all(command[0] == "py" for _, _, command in commands)
  (_, _, baseline), (_, _, convert), (_, _, orbax), (_, _, from_hf) = commands
  assert convert == ["py", "-m", "launch.convert", "--hf_dir=/ckpt/hf", "--out_dir=/ckpt/orbax",
                     "--dtype=bf16"]
  for command in (baseline, orbax, from_hf):
    assert command[1] == "-c"
    compile(command[2], "<command>", "exec")  # a syntax error here would only show in a run
    assert "from specedge_jax.checkpoints import orbax_io" in command[2]
  assert "orbax_io.load_model('/ckpt/orbax')" in orbax[2]
  assert "orbax_io.load_model('/ckpt/hf', dtype='bf16')" in from_hf[2]
  assert orbax[2].endswith(convert_bench.SKIP_TEARDOWN)
  assert from_hf[2].endswith(convert_bench.SKIP_TEARDOWN)
  assert not baseline[2].endswith(convert_bench.SKIP_TEARDOWN)


def test_memory_table_relates_peaks_to_the_checkpoint_and_the_baseline():
  rows = [("imports only (baseline)",
           convert_bench.PeakMemory(1_000_000_000, 1.0, "psutil polling")),
          ("launch.convert bf16 -> bf16",
           convert_bench.PeakMemory(1_500_000_000, 12.34, "psutil polling"))]
  table = convert_bench.memory_table(rows, size_bytes=500_000_000, num_layers=2,
                                     src_dtype="bf16")
  assert table.title == ("Peak RSS: 2-layer Qwen3-shaped checkpoint, 0.500 GB of bf16 weights "
                         "(psutil polling)")
  assert table.row_count == 2
  lines = _text(table).splitlines()
  convert_line = next(line for line in lines if "launch.convert" in line)
  for cell in ("1.500", "3.00x", "1.00x", "12.3"):
    assert cell in convert_line
  baseline_line = next(line for line in lines if "imports only" in line)
  for cell in ("1.000", "2.00x", "0.00x", "1.0"):
    assert cell in baseline_line
  text = "\n".join(lines)
  for column in ("process", "peak RSS GB", "peak / ckpt", "(peak - baseline) / ckpt", "wall s"):
    assert column in text


def test_latency_table_shows_median_and_spread():
  decode = convert_bench.Latency(1.0, 0.5, 2.0, 3)
  tree = convert_bench.Latency(3.0, 2.5, 4.25, 3)
  table = convert_bench.latency_table([("tiny", 1234567, decode, tree)], runs=3, tree_tokens=32,
                                      backend="cpu")
  assert table.title == ("Forward latency, jitted and warm, fp32, backend=cpu, median of 3 "
                         "(p10-p90), 256-row cached prefix, cache 512 rows")
  text = _text(table)
  for cell in ("model", "params", "decode T=1 ms", "tree T=32 ms", "tiny", "1,234,567",
               "1.000 (0.500-2.000)", "3.000 (2.500-4.250)"):
    assert cell in text
  presets = convert_bench.latency_presets()
  assert list(presets) == ["tiny (tests' tiny_config)", "small (d=256, 4 layers, V=4096)"]
  assert presets["small (d=256, 4 layers, V=4096)"].hidden_size == 256


def test_run_memory_refuses_a_checkpoint_under_min_mb(tmp_path):
  console = Console(file=io.StringIO())
  with pytest.raises(convert_bench.CheckpointTooSmall, match=r"MB < --min_mb=500; add layers"):
    convert_bench.run_memory(console, str(tmp_path), repo_root=str(tmp_path), hidden_size=32,
                             num_layers=1, intermediate_size=64, vocab_size=64, tie=True,
                             src_dtype="bf16", dtype="bf16", min_mb=500)
  assert os.path.exists(tmp_path / "hf" / "model.safetensors")  # written, then refused
  assert not os.path.exists(tmp_path / "orbax")  # nothing was measured
