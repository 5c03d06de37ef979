"""Converts an HF checkpoint folder into a specedge orbax checkpoint.

  python -m launch.convert --hf_dir=/models/Qwen3-14B --out_dir=/ckpt/qwen3_14b --dtype=bf16

The conversion streams: one copy of the model, in the target dtype, is held at a time. The
result loads with `specedge_jax.checkpoints.orbax_io.load_model(out_dir)`.
"""

from absl import app, flags
from rich.console import Console
from rich.progress import (
  BarColumn,
  DownloadColumn,
  Progress,
  SpinnerColumn,
  TextColumn,
  TimeElapsedColumn,
  TransferSpeedColumn,
)

from specedge_jax.checkpoints import hf, orbax_io

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF folder: config.json + *.safetensors.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output orbax checkpoint directory.")
_DTYPE = flags.DEFINE_enum("dtype", "bf16", ["fp32", "bf16", "fp16"], "Parameter dtype to store.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing converted checkpoint.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _HF_DIR.value or not _OUT_DIR.value:
    raise app.UsageError("--hf_dir and --out_dir are required")
  console = Console(stderr=True)
  try:
    entries = hf.hf_tensor_entries(_HF_DIR.value)  # headers only: sizes for the bar
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(),
                  console=console) as progress:
      reading = progress.add_task("reading", total=sum(e.nbytes for e in entries))
      done = [0]

      def on_tensor(entry):
        done[0] += 1
        progress.update(reading, advance=entry.nbytes,
                        description=f"[{done[0]}/{len(entries)}] {entry.name}")

      def on_saving():
        progress.update(reading, description=f"read {len(entries)} tensors")
        progress.add_task(f"writing {_OUT_DIR.value}", total=None)

      config = orbax_io.convert_hf(_HF_DIR.value, _OUT_DIR.value, _DTYPE.value,
                                   overwrite=_OVERWRITE.value, on_tensor=on_tensor,
                                   on_saving=on_saving)
  except hf.CheckpointError as e:
    console.print(f"[bold red]conversion failed:[/] {e}")
    raise SystemExit(1) from e
  console.print(f"wrote {config.model_type} ({config.num_layers} layers, {_DTYPE.value}) "
                f"to {_OUT_DIR.value}")


if __name__ == "__main__":
  app.run(main)
