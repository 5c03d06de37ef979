"""bf16 greedy agreement of a target/draft pair (issue 13; the logic of `launch/bench_bf16.py`).

Speculative decoding is exact in exact arithmetic, and in fp32 the project's greedy speculative
output equals target-only output token for token (tests/engine/test_speculative.py). In bf16 it
need not: a tree verify forwards T tokens in one program and a decode step forwards one, so the
reductions round differently, and where the target's top two logits nearly tie the argmax can
flip. This module measures how often that happens, on the embedded prompts, with weights and KV
caches both in bf16:

  target_bf16  target-only greedy decoding in bf16
  spec_bf16    speculative greedy decoding (draft trees verified by the target) in bf16
  target_fp32  target-only greedy decoding in fp32, the reference
  spec_fp32    speculative greedy decoding in fp32: must equal target_fp32 (checked, raised)

Generation is the project's in-process path (`engine.generate` over a `TargetEngine` and a
`DraftEngine`). For each compared pair of runs it reports, per prompt and overall: how many
positions agree up to the first divergence (the token agreement rate), whether whole sequences
match (the exact-match rate), and the first divergence (prompt, index, the two tokens, and the
target's top-2 logit margin there). The margin comes from one extra uncached forward of the
prompt plus the common prefix (a third program, so it shows how close the tie was, not which
side either run took).

This module owns the comparison and its table/JSON; it never changes an engine.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

# The comparisons reported, as (first run, second run); the first is the one being judged.
COMPARISONS = (("spec_bf16", "target_bf16"), ("target_bf16", "target_fp32"),
               ("spec_bf16", "target_fp32"))
RUNS = ("target_fp32", "spec_fp32", "target_bf16", "spec_bf16")
DEFAULT_TREE = "32:4:16:32"  # the reference's SpecExec tree (beams:depth:branch:budget)


class ExactnessError(AssertionError):
  """fp32 speculative output differs from fp32 target-only output: a lossy verifier."""


@dataclasses.dataclass(frozen=True)
class Divergence:
  """Where two greedy sequences of one prompt part: position `index` of the generated tokens
  (0 = the first generated token). A token is None past the end of a shorter sequence (one run
  stopped at EOS earlier)."""

  prompt: int
  index: int
  token_a: int | None
  token_b: int | None
  # The target's logits at that point (prompt + the common prefix), when computed: top-1 minus
  # top-2 of the bf16 and the fp32 target, and the fp32 target's logit of token_a minus token_b.
  margin_bf16: float | None = None
  margin_fp32: float | None = None
  gap_fp32: float | None = None
  text_a: str | None = None
  text_b: str | None = None


@dataclasses.dataclass(frozen=True)
class PromptAgreement:
  prompt: int
  length: int  # the longer of the two sequences
  agreed: int  # positions equal before the first divergence
  divergence: Divergence | None  # None: the sequences are identical

  @property
  def rate(self) -> float:
    return self.agreed / self.length if self.length else 1.0

  @property
  def exact(self) -> bool:
    return self.divergence is None


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
  """The first index where a and b differ (a shorter sequence differs where it ends); None if
  they are equal."""
  for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
      return i
  return None if len(a) == len(b) else min(len(a), len(b))


def compare_prompt(prompt: int, a: Sequence[int], b: Sequence[int]) -> PromptAgreement:
  index = first_divergence(a, b)
  length = max(len(a), len(b))
  if index is None:
    return PromptAgreement(prompt, length, length, None)
  at = lambda seq: int(seq[index]) if index < len(seq) else None
  return PromptAgreement(prompt, length, index, Divergence(prompt, index, at(a), at(b)))


@dataclasses.dataclass(frozen=True)
class Agreement:
  """One run judged against another, over all prompts."""

  a: str
  b: str
  prompts: tuple[PromptAgreement, ...]

  @property
  def name(self) -> str:
    return f"{self.a} vs {self.b}"

  @property
  def token_agreement_rate(self) -> float:
    """Positions equal up to each prompt's first divergence, over all positions."""
    total = sum(p.length for p in self.prompts)
    return sum(p.agreed for p in self.prompts) / total if total else 1.0

  @property
  def exact_match_rate(self) -> float:
    return sum(p.exact for p in self.prompts) / len(self.prompts) if self.prompts else 1.0

  @property
  def first_divergence(self) -> Divergence | None:
    """The earliest divergence of any prompt (lowest index, then lowest prompt)."""
    found = [p.divergence for p in self.prompts if p.divergence is not None]
    return min(found, key=lambda d: (d.index, d.prompt)) if found else None

  def to_json(self) -> dict[str, Any]:
    first = self.first_divergence
    return {
        "a": self.a, "b": self.b, "num_prompts": len(self.prompts),
        "token_agreement_rate": self.token_agreement_rate,
        "exact_match_rate": self.exact_match_rate,
        "num_diverged": sum(not p.exact for p in self.prompts),
        "first_divergence": None if first is None else dataclasses.asdict(first),
        "prompts": [{"prompt": p.prompt, "length": p.length, "agreed": p.agreed,
                     "agreement_rate": p.rate, "exact": p.exact,
                     "divergence": None if p.exact else dataclasses.asdict(p.divergence)}
                    for p in self.prompts],
    }


def compare_runs(outputs: dict[str, list[list[int]]], a: str, b: str) -> Agreement:
  if len(outputs[a]) != len(outputs[b]):
    raise ValueError(f"{a} has {len(outputs[a])} sequences, {b} has {len(outputs[b])}")
  return Agreement(a, b, tuple(compare_prompt(i, x, y)
                               for i, (x, y) in enumerate(zip(outputs[a], outputs[b]))))


def check_fp32_exact(outputs: dict[str, list[list[int]]]) -> None:
  """Raises ExactnessError unless fp32 speculative output equals fp32 target-only output."""
  if outputs["spec_fp32"] != outputs["target_fp32"]:
    bad = compare_runs(outputs, "spec_fp32", "target_fp32").first_divergence
    raise ExactnessError(f"fp32 speculative output differs from fp32 target-only output "
                         f"(prompt {bad.prompt}, position {bad.index}: {bad.token_a} vs "
                         f"{bad.token_b}): the verifier is not lossless")


# ----------------------------------------------------------------------------------------------
# Running the pair.


@dataclasses.dataclass
class AgreementReport:
  setup: dict[str, Any]
  outputs: dict[str, list[list[int]]]  # run name -> generated tokens per prompt
  agreements: list[Agreement]
  mean_accepted: dict[str, float]  # spec run -> tokens per verification
  wall_s: dict[str, float]  # run name -> generation wall seconds (compiles included)

  @property
  def fp32_exact(self) -> bool:
    return self.outputs["spec_fp32"] == self.outputs["target_fp32"]

  def to_json(self) -> dict[str, Any]:
    return {"setup": self.setup, "fp32_exact": self.fp32_exact,
            "mean_accepted": self.mean_accepted, "wall_s": self.wall_s,
            "comparisons": {a.name.replace(" ", "_"): a.to_json() for a in self.agreements},
            "outputs": self.outputs}


@functools.lru_cache(maxsize=None)
def _last_logits_fn():
  """A jitted uncached forward returning the logits after the last real token of one padded
  sequence; one compile per padded length (powers of two)."""
  import jax
  import jax.numpy as jnp

  from specedge_jax.models import transformer

  @functools.partial(jax.jit, static_argnames=("graphdef",))
  def last_logits(graphdef, state, tokens, length):
    seq = tokens.shape[0]
    model = transformer.bind(graphdef, state)
    mask = transformer.causal_mask(length[None], seq)
    logits, _ = model(tokens[None], jnp.arange(seq, dtype=jnp.int32)[None], mask,
                      logits_at=(length - 1)[None, None])
    return logits[0, 0]

  return last_logits


def target_logits(engine, context: Sequence[int]) -> np.ndarray:
  """The target's next-token logits [V] after `context`, from the engine's own weights."""
  size = 1 << max(0, len(context) - 1).bit_length()
  tokens = np.zeros(size, np.int32)
  tokens[:len(context)] = context
  return np.asarray(_last_logits_fn()(engine.graphdef, engine.state, tokens,
                                      np.int32(len(context))))


def _top2_margin(logits: np.ndarray) -> float:
  top = np.sort(logits)[-2:]
  return float(top[1] - top[0])


def with_margins(agreement: Agreement, prompts: Sequence[Sequence[int]],
                 outputs: dict[str, list[list[int]]], engines: dict[str, Any],
                 tokenizer=None) -> Agreement:
  """The agreement with each divergence's margins (and token texts) filled in: one uncached
  forward of prompt + common prefix per diverged prompt and dtype."""
  filled = []
  for p in agreement.prompts:
    d = p.divergence
    if d is None:
      filled.append(p)
      continue
    context = list(prompts[p.prompt]) + list(outputs[agreement.a][p.prompt][:d.index])
    with precision("bf16"):
      bf16 = target_logits(engines["bf16"], context)
    with precision("fp32"):
      fp32 = target_logits(engines["fp32"], context)
    gap = (float(fp32[d.token_a] - fp32[d.token_b])
           if d.token_a is not None and d.token_b is not None else None)
    text = lambda t: None if tokenizer is None or t is None else tokenizer.decode([t])
    filled.append(dataclasses.replace(p, divergence=dataclasses.replace(
        d, margin_bf16=_top2_margin(bf16), margin_fp32=_top2_margin(fp32), gap_fp32=gap,
        text_a=text(d.token_a), text_b=text(d.token_b))))
  return dataclasses.replace(agreement, prompts=tuple(filled))


def precision(dtype: str):
  """The matmul precision context of a run: fp32 runs ask for true fp32 products. On NVIDIA GPUs
  XLA's default lets fp32 dots run in TF32 (10 mantissa bits, close to bf16's 8), which would
  make the fp32 reference a reduced-precision run and its exactness check meaningless."""
  import jax

  return jax.default_matmul_precision("highest" if dtype == "fp32" else "default")


def measure(target_dir: str, draft_dir: str, prompts: Sequence[Sequence[int]], *,
            max_new_tokens: int, tree_spec: str = DEFAULT_TREE, batch_size: int = 4,
            tokenizer=None, progress=None, strict: bool = True) -> AgreementReport:
  """Runs the four generations of the module docstring on `prompts` and compares them.

  Raises ExactnessError if fp32 speculative output differs from fp32 target-only output (with
  `strict`; otherwise the report's `fp32_exact` says so). `progress(run_name)`, if given, is
  called before each run.
  """
  import time

  import jax
  import jax.numpy as jnp

  from specedge_jax import engine as E
  from specedge_jax.bench import core as core_bench
  from specedge_jax.checkpoints import orbax_io

  tree = core_bench.parse_tree(tree_spec)
  max_len = max(len(p) for p in prompts) + max_new_tokens + tree.max_budget + 8
  outputs, mean_accepted, wall_s, engines = {}, {}, {}, {}
  for dtype, cache_dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
    target = orbax_io.load_model(target_dir, dtype=dtype)
    draft = orbax_io.load_model(draft_dir, dtype=dtype)
    eos = target.config.eos_token_ids
    target_engine = E.TargetEngine(target, num_slots=batch_size, max_len=max_len,
                                   max_tree_nodes=tree.max_budget + 1,
                                   max_batch_size=batch_size, eos_token_ids=eos,
                                   cache_dtype=cache_dtype)
    draft_engine = E.DraftEngine(draft, num_slots=batch_size, max_len=max_len, tree=tree,
                                 cache_dtype=cache_dtype)
    del target, draft  # the engines hold their own (unstacked) weights
    engines[dtype] = target_engine
    for kind, drafter in (("target", None), ("spec", draft_engine)):
      name = f"{kind}_{dtype}"
      if progress:
        progress(name)
      start = time.perf_counter()
      with precision(dtype):  # read at trace time: the engines compile inside this context
        out = E.generate(target_engine, prompts, draft=drafter, sampling=E.GREEDY,
                         max_new_tokens=max_new_tokens)
      wall_s[name] = time.perf_counter() - start
      outputs[name] = out.tokens
      if drafter is not None:
        mean_accepted[name] = out.mean_accepted
  if strict:
    check_fp32_exact(outputs)
  agreements = [with_margins(compare_runs(outputs, a, b), prompts, outputs, engines, tokenizer)
                for a, b in COMPARISONS]
  setup = {"target": target_dir, "draft": draft_dir, "num_prompts": len(prompts),
           "max_new_tokens": max_new_tokens, "tree": tree_spec, "batch_size": batch_size,
           "weights_dtype": "bf16 (bf16 runs) / fp32 (fp32 runs)",
           "kv_cache_dtype": "same as the weights",
           "fp32_matmul_precision": "highest (no TF32)",
           "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
           "jax_version": jax.__version__}
  return AgreementReport(setup=setup, outputs=outputs, agreements=agreements,
                         mean_accepted=mean_accepted, wall_s=wall_s)


def run(target_dir: str, draft_dir: str, *, num_prompts: int, max_new_tokens: int,
        tree_spec: str = DEFAULT_TREE, batch_size: int = 4, prompts_path: str | None = None,
        out_json: str | None = None, console=None) -> AgreementReport:
  """What `launch/bench_bf16.py` does: the first `num_prompts` embedded prompts, the four runs,
  the tables, and the JSON when asked."""
  from rich.console import Console

  from specedge_jax.data import assets
  from specedge_jax.data import prompts as prompts_lib
  from specedge_jax.data import tokenizers

  console = console or Console(width=None if sys.stdout.isatty() else 160)
  tokenizer = tokenizers.load_tokenizer(target_dir)
  records = prompts_lib.load_records(prompts_path or assets.DEFAULT_PROMPTS)
  if num_prompts > len(records):
    raise ValueError(f"{num_prompts} prompts asked, the prompt set has {len(records)}")
  prompt_ids = prompts_lib.encode_all(tokenizer, records[:num_prompts])
  with console.status("generating ...") as status:
    report = measure(target_dir, draft_dir, prompt_ids, max_new_tokens=max_new_tokens,
                     tree_spec=tree_spec, batch_size=batch_size, tokenizer=tokenizer,
                     progress=lambda name: status.update(f"generating: {name} ..."))
  console.print(summary_table(report))
  console.print(prompt_table(report))
  if out_json:
    write_json(out_json, report)
    console.print(f"json: {out_json}")
  return report


# ----------------------------------------------------------------------------------------------
# Tables and JSON.

SUMMARY_COLUMNS = ("comparison", "token agreement", "exact match", "diverged",
                   "first divergence (prompt, index: a vs b)", "top-2 margin bf16 / fp32",
                   "fp32 logit gap a-b")


def _number(value: float | None, fmt: str = ".3f") -> str:
  return "-" if value is None else format(value, fmt)


def summary_row(agreement: Agreement) -> list[str]:
  first = agreement.first_divergence
  where = "-" if first is None else (f"{first.prompt}, {first.index}: {first.token_a} vs "
                                     f"{first.token_b}")
  margins = "-" if first is None else (f"{_number(first.margin_bf16)} / "
                                       f"{_number(first.margin_fp32)}")
  return [agreement.name, f"{agreement.token_agreement_rate:.1%}",
          f"{agreement.exact_match_rate:.1%}",
          f"{sum(not p.exact for p in agreement.prompts)} / {len(agreement.prompts)}", where,
          margins, "-" if first is None else _number(first.gap_fp32)]


def summary_table(report: AgreementReport):
  from rich.table import Table

  setup = report.setup
  table = Table(title=f"greedy agreement, {setup['num_prompts']} prompts x "
                f"{setup['max_new_tokens']} tokens, tree {setup['tree']}, "
                f"{setup['device_kind']}; fp32 speculative == fp32 target: "
                f"{'yes' if report.fp32_exact else 'NO'}")
  for column in SUMMARY_COLUMNS:
    table.add_column(column, justify="right")
  for agreement in report.agreements:
    table.add_row(*summary_row(agreement))
  return table


def prompt_table(report: AgreementReport):
  """Per prompt: agreed/length and the divergence of each comparison."""
  from rich.table import Table

  table = Table(title="per prompt: agreed / length (first divergence index: a vs b, "
                "bf16 top-2 margin)")
  table.add_column("prompt", justify="right")
  for agreement in report.agreements:
    table.add_column(agreement.name, justify="right")
  for i in range(report.setup["num_prompts"]):
    cells = []
    for agreement in report.agreements:
      p = agreement.prompts[i]
      cell = f"{p.agreed}/{p.length}"
      if p.divergence is not None:
        d = p.divergence
        cell += f" ({d.index}: {d.token_a} vs {d.token_b}, {_number(d.margin_bf16, '.2f')})"
      cells.append(cell)
    table.add_row(str(i), *cells)
  return table


def write_json(path: str, report: AgreementReport) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(report.to_json(), f, indent=2)
  return path
