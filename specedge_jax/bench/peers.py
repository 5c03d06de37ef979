"""Head-to-head benchmark of the whole speculative loop against PyTorch peers (the logic behind
`launch/bench_peers.py`).

Methods, all greedy, batch size 1, one prompt at a time, on the same HF target/draft folders:

  ours-speculative   `engine.generate` with a `DraftEngine` (JAX, jitted SpecExec grow + verify)
  ours-target-only   `engine.generate` without a draft (JAX autoregressive decoding)
  torch-specexec     `torch_reference.TorchSpecExec`: the same SpecExec algorithm and tree
                     parameters, written plainly on HF PyTorch models with DynamicCaches
  hf-assisted        `target_hf.generate(assistant_model=draft_hf, do_sample=False)`: HF's
                     assisted generation (a draft chain, not a tree; HF's default schedule)
  hf-greedy          `target_hf.generate(do_sample=False)`: the reference output

Every method must emit the reference's tokens exactly (token lists compared; texts too when the
folder has a tokenizer). All stop at the same EOS ids and at `max_new_tokens` (the first token
counts, as in HF's `max_new_tokens`).

Timing: one warm-up generation per method first (jit compilation, first-call allocations). Then
`repeats` passes over the prompts; within a pass each prompt runs every method back to back, in
an order that rotates from prompt to prompt, so load from other processes on a shared machine
hits all methods alike. A method's time on a prompt is its best pass (interference only ever
adds time); tokens/s = all tokens / the sum of those times.

Where the time goes: for the torch methods, forward hooks on the HF models add up the time spent
inside the target's and the draft's forward calls and count the target calls; the rest of a
generation is the loop's own host work (Python, logits processing, cache management). For our
engine the per-step draft and verify wall times come from `engine.StepStats`.

`run` is `launch/bench_peers.py`'s whole run: the prompts, `run_peer_bench`, the printed summary
(`summary_table`, `print_summary`), the plot and the JSON.

This module owns the benchmark. It never changes models, engines or the reference.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Callable, Sequence

from specedge_jax import engine as E
from specedge_jax.data import tokenizers

METHODS = ("ours-speculative", "ours-target-only", "torch-specexec", "hf-assisted", "hf-greedy")
REFERENCE = "hf-greedy"


@dataclasses.dataclass
class MethodResult:
  """One method over all prompts (timed passes only)."""

  name: str
  tokens: list[list[int]]  # per prompt, generated tokens (first token included)
  seconds: list[float]  # per prompt, best pass
  target_calls: int = 0  # target model calls of the best passes (prefill included)
  target_forward_s: float = 0.0  # time inside target model calls (torch methods)
  draft_forward_s: float = 0.0  # time inside draft model calls (torch methods)
  draft_s: float = 0.0  # our engine: time in draft() calls
  verify_s: float = 0.0  # our engine: time in verify()/decode() calls

  @property
  def num_tokens(self) -> int:
    return sum(len(t) for t in self.tokens)

  @property
  def total_s(self) -> float:
    return float(sum(self.seconds))

  @property
  def tokens_per_s(self) -> float:
    return self.num_tokens / self.total_s if self.total_s > 0 else 0.0

  @property
  def tokens_per_target_call(self) -> float:
    return self.num_tokens / self.target_calls if self.target_calls else 0.0


@dataclasses.dataclass
class PeerBenchResult:
  methods: dict[str, MethodResult]
  identical_tokens: dict[str, bool]  # method -> tokens equal to the reference's, every prompt
  identical_texts: dict[str, bool] | None  # the same on decoded texts (None: no tokenizer)
  num_prompts: int
  max_new_tokens: int
  tree: E.TreeParams
  eos_token_ids: tuple[int, ...]
  hf_assistant_settings: dict

  def speedup(self, method: str, over: str) -> float:
    return self.methods[method].tokens_per_s / self.methods[over].tokens_per_s

  def to_json(self) -> dict:
    return {
        "num_prompts": self.num_prompts, "max_new_tokens": self.max_new_tokens,
        "tree": dataclasses.asdict(self.tree), "eos_token_ids": list(self.eos_token_ids),
        "hf_assistant_settings": self.hf_assistant_settings,
        "methods": {name: dict(dataclasses.asdict(m), tokens_per_s=m.tokens_per_s,
                               num_tokens=m.num_tokens, total_s=m.total_s,
                               tokens_per_target_call=m.tokens_per_target_call)
                    for name, m in self.methods.items()},
        "identical_tokens": self.identical_tokens, "identical_texts": self.identical_texts,
        "speedups": {f"{a} / {b}": self.speedup(a, b) for a, b in self.headline_pairs()},
    }

  def headline_pairs(self) -> list[tuple[str, str]]:
    """The comparisons the benchmark is for, where both methods ran."""
    pairs = [("ours-speculative", "torch-specexec"), ("ours-speculative", "hf-assisted")]
    return [(a, b) for a, b in pairs if a in self.methods and b in self.methods]


class _ForwardTimer:
  """Forward hooks on an HF model: calls and seconds spent inside `forward`."""

  def __init__(self, model):
    self.calls, self.seconds, self._start = 0, 0.0, 0.0
    self._handles = [model.register_forward_pre_hook(self._pre),
                     model.register_forward_hook(self._post)]

  def _pre(self, module, args):
    self._start = time.perf_counter()

  def _post(self, module, args, output):
    self.seconds += time.perf_counter() - self._start
    self.calls += 1

  def reset(self) -> None:
    self.calls, self.seconds = 0, 0.0

  def remove(self) -> None:
    for handle in self._handles:
      handle.remove()


@dataclasses.dataclass
class _Run:
  tokens: list[int]
  wall_s: float
  target_calls: int = 0
  target_forward_s: float = 0.0
  draft_forward_s: float = 0.0
  draft_s: float = 0.0
  verify_s: float = 0.0


def load_torch_model(folder: str):
  """HF transformers' PyTorch model from an HF folder, float32, eval mode."""
  import torch
  import transformers

  return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _load_tokenizer(folder: str):
  """The folder's tokenizer, or None when it has none (random test checkpoints)."""
  return tokenizers.load_tokenizer(folder) if tokenizers.has_tokenizer(folder) else None


def run_peer_bench(target_dir: str, draft_dir: str, prompts: Sequence[Sequence[int]], *,
                   max_new_tokens: int, tree: E.TreeParams = E.TreeParams(),
                   eos_token_ids: Sequence[int] | None = None, repeats: int = 1,
                   methods: Sequence[str] = METHODS, hf_num_assistant_tokens: int | None = None,
                   hf_assistant_confidence_threshold: float | None = None,
                   torch_threads: int | None = None,
                   on_progress: Callable[[str], None] | None = None) -> PeerBenchResult:
  """Runs every method on every prompt; see the module docstring for the protocol.

  Args:
    target_dir, draft_dir: HF folders (config.json + safetensors); both sides load them.
    prompts: token ids per prompt.
    max_new_tokens: tokens generated per prompt (the first one included), fewer at EOS.
    tree: SpecExec parameters, shared by our engine and the torch reference.
    eos_token_ids: stop tokens for every method; None takes the target config's.
    repeats: timed passes over the prompts (each prompt keeps its best pass).
    methods: which of METHODS to run; the reference (hf-greedy) always runs.
    hf_num_assistant_tokens, hf_assistant_confidence_threshold: HF assisted generation's
      draft length and early-stop threshold; None leaves HF's defaults (20 and 0.4 in
      transformers 5).
    torch_threads: torch intra-op threads; None leaves torch's default.
  """
  import torch

  unknown = set(methods) - set(METHODS)
  if unknown:
    raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("need at least one prompt, and every prompt must be non-empty")
  if max_new_tokens < 1 or repeats < 1:
    raise ValueError("max_new_tokens and repeats must be >= 1")
  methods = [m for m in METHODS if m in methods or m == REFERENCE]
  previous_threads = torch.get_num_threads()
  if torch_threads:
    torch.set_num_threads(torch_threads)
  try:
    return _run(target_dir, draft_dir, prompts, max_new_tokens=max_new_tokens, tree=tree,
                eos_token_ids=eos_token_ids, repeats=repeats, methods=methods,
                hf_num_assistant_tokens=hf_num_assistant_tokens,
                hf_assistant_confidence_threshold=hf_assistant_confidence_threshold,
                progress=on_progress or (lambda message: None))
  finally:
    torch.set_num_threads(previous_threads)  # the setting is process-wide


def _run(target_dir, draft_dir, prompts, *, max_new_tokens, tree, eos_token_ids, repeats,
         methods, hf_num_assistant_tokens, hf_assistant_confidence_threshold,
         progress) -> PeerBenchResult:
  import torch

  from specedge_jax.bench import torch_specexec as torch_reference
  from specedge_jax.checkpoints import orbax_io


  progress("loading models")
  target_jax = orbax_io.load_model(target_dir)
  draft_jax = orbax_io.load_model(draft_dir)
  target_hf, draft_hf = load_torch_model(target_dir), load_torch_model(draft_dir)
  tokenizer = _load_tokenizer(target_dir)
  eos = tuple(int(t) for t in (target_jax.config.eos_token_ids if eos_token_ids is None
                               else eos_token_ids))
  # HF generate reads stop ids from the generation config (and would fall back to the
  # checkpoint's own); set both models' so every method stops at exactly `eos`.
  for model in (target_hf, draft_hf):
    model.generation_config.eos_token_id = list(eos) or None
    model.generation_config.pad_token_id = eos[0] if eos else 0
  assistant_settings = {}
  if hf_num_assistant_tokens is not None:
    draft_hf.generation_config.num_assistant_tokens = hf_num_assistant_tokens
  if hf_assistant_confidence_threshold is not None:
    draft_hf.generation_config.assistant_confidence_threshold = hf_assistant_confidence_threshold
  defaults = draft_hf.generation_config._get_default_generation_params()
  for key in ("num_assistant_tokens", "num_assistant_tokens_schedule",
              "assistant_confidence_threshold"):
    value = getattr(draft_hf.generation_config, key, None)
    assistant_settings[key] = defaults.get(key) if value is None else value

  max_len = max(len(p) for p in prompts) + max_new_tokens + tree.max_budget + 8
  target_engine = E.TargetEngine(target_jax, num_slots=1, max_len=max_len,
                                 max_tree_nodes=tree.max_budget + 1, max_batch_size=1,
                                 eos_token_ids=eos)
  # Proactive drafting off: in process there is no verification wait to hide it in, and the
  # torch reference does not have it either; both run the same SpecExec loop.
  draft_engine = E.DraftEngine(draft_jax, num_slots=1, max_len=max_len, tree=tree)
  reference_loop = torch_reference.TorchSpecExec(target_hf, draft_hf, tree, eos)
  target_timer, draft_timer = _ForwardTimer(target_hf), _ForwardTimer(draft_hf)
  greedy = E.GREEDY

  def ours(prompt, speculative: bool) -> _Run:
    out = E.generate(target_engine, [list(prompt)], draft=draft_engine if speculative else None,
                     sampling=greedy, max_new_tokens=max_new_tokens)
    return _Run(tokens=out.tokens[0], wall_s=out.wall_s, target_calls=1 + len(out.steps),
                draft_s=sum(s.draft_s for s in out.steps),
                verify_s=sum(s.verify_s for s in out.steps))

  def timed_torch(fn) -> _Run:
    target_timer.reset()
    draft_timer.reset()
    start = time.perf_counter()
    tokens = fn()
    wall = time.perf_counter() - start
    return _Run(tokens=tokens, wall_s=wall, target_calls=target_timer.calls,
                target_forward_s=target_timer.seconds, draft_forward_s=draft_timer.seconds)

  def hf_generate(prompt, assisted: bool) -> _Run:
    input_ids = torch.tensor([list(prompt)], dtype=torch.long)
    extra = {"assistant_model": draft_hf} if assisted else {}

    def call():
      with torch.inference_mode():
        out = target_hf.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                 do_sample=False, max_new_tokens=max_new_tokens, **extra)
      return out[0, input_ids.shape[1]:].tolist()

    return timed_torch(call)

  runners = {
      "ours-speculative": lambda p: ours(p, True),
      "ours-target-only": lambda p: ours(p, False),
      "torch-specexec": lambda p: timed_torch(
          lambda: reference_loop.generate(list(p), max_new_tokens).tokens),
      "hf-assisted": lambda p: hf_generate(p, True),
      "hf-greedy": lambda p: hf_generate(p, False),
  }

  progress("warming up")
  target_engine.warmup(decode="ours-target-only" in methods)
  # The shortest and the longest prompt: the draft engine compiles its prefill per chunk size
  # on first use, and a prompt longer than the small chunk is the only one that needs both.
  for prompt in {len(p): p for p in sorted(prompts, key=len)[::len(prompts) - 1 or 1]}.values():
    for name in methods:
      runners[name](prompt)

  best: dict[str, list[_Run | None]] = {name: [None] * len(prompts) for name in methods}
  for rep in range(repeats):
    for index, prompt in enumerate(prompts):
      progress(f"pass {rep + 1}/{repeats}, prompt {index + 1}/{len(prompts)}")
      shift = index % len(methods)
      for name in methods[shift:] + methods[:shift]:
        run = runners[name](prompt)
        if best[name][index] is None or run.wall_s < best[name][index].wall_s:
          best[name][index] = run
  target_timer.remove()
  draft_timer.remove()

  results = {}
  for name in methods:
    runs = best[name]
    results[name] = MethodResult(
        name=name, tokens=[r.tokens for r in runs], seconds=[r.wall_s for r in runs],
        target_calls=sum(r.target_calls for r in runs),
        target_forward_s=sum(r.target_forward_s for r in runs),
        draft_forward_s=sum(r.draft_forward_s for r in runs),
        draft_s=sum(r.draft_s for r in runs), verify_s=sum(r.verify_s for r in runs))
  reference = results[REFERENCE].tokens
  identical_tokens = {name: m.tokens == reference for name, m in results.items()}
  identical_texts = None
  if tokenizer is not None:
    reference_texts = [tokenizer.decode(t) for t in reference]
    identical_texts = {name: [tokenizer.decode(t) for t in m.tokens] == reference_texts
                       for name, m in results.items()}
  return PeerBenchResult(methods=results, identical_tokens=identical_tokens,
                         identical_texts=identical_texts, num_prompts=len(prompts),
                         max_new_tokens=max_new_tokens, tree=tree, eos_token_ids=eos,
                         hf_assistant_settings=assistant_settings)


def first_mismatch(result: PeerBenchResult, method: str) -> tuple[int, int] | None:
  """(prompt index, token index) of the first token where `method` departs from the reference."""
  for index, (have, want) in enumerate(zip(result.methods[method].tokens,
                                           result.methods[REFERENCE].tokens)):
    if have != want:
      position = next((i for i, (a, b) in enumerate(zip(have, want)) if a != b),
                      min(len(have), len(want)))
      return index, position
  return None


def plot_tokens_per_s(result: PeerBenchResult, path: str) -> None:
  """A bar chart of tokens/s per method."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(result.methods)
  values = [result.methods[n].tokens_per_s for n in names]
  fig, ax = plt.subplots(figsize=(7, 4))
  bars = ax.bar(names, values, color=["tab:blue" if n.startswith("ours") else "tab:orange"
                                      for n in names])
  ax.bar_label(bars, fmt="%.0f")
  ax.set_ylim(top=1.15 * max(values))  # room for the labels
  ax.set_ylabel("tokens / s (batch 1, greedy)")
  ax.set_title(f"{result.num_prompts} prompts x {result.max_new_tokens} tokens, tree "
               f"{dataclasses.astuple(result.tree)}")
  ax.tick_params(axis="x", rotation=20)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def summary_rows(result: PeerBenchResult) -> list[list[str]]:
  """Table rows: method, tok/s, x of hf-assisted, tokens, tokens per target call, where the
  time goes, identical."""
  rows = []
  assisted = result.methods.get("hf-assisted")
  for name, m in result.methods.items():
    if name.startswith("ours"):
      split = f"draft {m.draft_s / m.total_s:.0%}, verify/decode {m.verify_s / m.total_s:.0%}"
    else:
      other = m.total_s - m.target_forward_s - m.draft_forward_s
      split = (f"target fwd {m.target_forward_s / m.total_s:.0%}, draft fwd "
               f"{m.draft_forward_s / m.total_s:.0%}, other {other / m.total_s:.0%}")
    same = result.identical_tokens[name]
    if result.identical_texts is not None:
      same = same and result.identical_texts[name]
    rows.append([name, f"{m.tokens_per_s:.1f}",
                 f"{m.tokens_per_s / assisted.tokens_per_s:.2f}x" if assisted else "-",
                 str(m.num_tokens), f"{m.tokens_per_target_call:.2f}", split,
                 "yes" if same else "NO"])
  return rows


SUMMARY_COLUMNS = ("method", "tokens/s", "x hf-assisted", "tokens", "tokens/target call",
                   "where the time goes", "identical")


def check_identical(result: PeerBenchResult) -> list[str]:
  """Human-readable mismatch descriptions (empty when every method matches the reference)."""
  problems = []
  for name in result.methods:
    where = first_mismatch(result, name)
    if where is not None:
      problems.append(f"{name}: prompt {where[0]} departs from {REFERENCE} at token {where[1]}")
    elif result.identical_texts is not None and not result.identical_texts[name]:
      problems.append(f"{name}: decoded text differs from {REFERENCE}")
  return problems


def summary_table(result: PeerBenchResult):
  """The rich table of `summary_rows`, titled with the run's settings."""
  from rich.table import Table

  table = Table(title=f"greedy generation, batch 1, {result.num_prompts} prompts x "
                f"<= {result.max_new_tokens} tokens, tree {tuple(vars(result.tree).values())}, "
                f"HF assistant {result.hf_assistant_settings}")
  for column in SUMMARY_COLUMNS:
    table.add_column(column, justify="left" if column in ("method", "where the time goes")
                     else "right")
  for row in summary_rows(result):
    table.add_row(*row)
  return table


def print_summary(result: PeerBenchResult, console) -> None:
  """The table, the headline speed-ups, and every mismatch against the reference."""
  console.print(summary_table(result))
  for name, over in result.headline_pairs():
    console.print(f"{name} / {over}: {result.speedup(name, over):.2f}x tokens/s")
  for problem in check_identical(result):
    console.print(f"[red]MISMATCH[/red] {problem}")


def write_json(result: PeerBenchResult, path: str) -> None:
  with open(path, "w") as f:
    json.dump(result.to_json(), f, indent=2)


def run(target_dir: str, draft_dir: str, prompts_path: str, *, num_prompts: int,
        max_new_tokens: int, tree: E.TreeParams, eos_token_ids: Sequence[int] | None,
        repeats: int, methods: Sequence[str] | None = None,
        hf_num_assistant_tokens: int | None = None,
        hf_assistant_confidence_threshold: float | None = None,
        torch_threads: int | None = None, out_json: str | None = None,
        plot: str | None = None, console=None) -> PeerBenchResult:
  """What `launch/bench_peers.py` does: encodes the first `num_prompts` prompt records with the
  target's tokenizer, runs `run_peer_bench`, prints the summary, and writes the plot and JSON
  when asked. `methods` None runs all of METHODS."""
  from rich.console import Console

  from specedge_jax.data import prompts as prompts_lib

  # Piped output (logs, notes) gets a table wide enough not to wrap every cell.
  console = console or Console(width=None if sys.stdout.isatty() else 170)
  tokenizer = tokenizers.load_tokenizer(target_dir)
  prompt_ids = prompts_lib.encode_all(tokenizer, prompts_lib.load_records(prompts_path))
  prompt_ids = prompt_ids[:num_prompts]
  with console.status("") as status:
    result = run_peer_bench(
        target_dir, draft_dir, prompt_ids, max_new_tokens=max_new_tokens, tree=tree,
        eos_token_ids=eos_token_ids, repeats=repeats, methods=methods or METHODS,
        hf_num_assistant_tokens=hf_num_assistant_tokens,
        hf_assistant_confidence_threshold=hf_assistant_confidence_threshold,
        torch_threads=torch_threads, on_progress=status.update)
  print_summary(result, console)
  if plot:
    plot_tokens_per_s(result, plot)
    console.print(f"plot: {plot}")
  if out_json:
    write_json(result, out_json)
  return result
