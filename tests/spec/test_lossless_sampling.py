"""Invariant 3: with sampling, speculative output has exactly the target's distribution.

A vocabulary of 8 makes every next-token probability enumerable. Each test compares empirical
counts with exact probabilities by a chi-square goodness-of-fit test at significance
ALPHA = 0.001 (cells with expected count < 5 merged), with fixed seeds so runs are reproducible.

(a) Verification alone, over hypothesis-drawn trees (including trees that miss the target's
    likely tokens): the first emitted token, and the first two, follow the target. A counter-test
    makes verification lossy (one shared random draw for all nodes of a tree, which keeps every
    marginal right but correlates consecutive tokens) and checks the test then fails.
(b) End to end: 3-token continuations from speculative decoding and from target-only sampling
    both follow the target's exact 3-token distribution.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from specedge_jax import engine as E
from specedge_jax.engine import prefill as engine_prefill
from specedge_jax.models import kv_cache as kv
from specedge_jax.models.transformer import causal_mask, split_model
from specedge_jax.spec import sampling
from specedge_jax.spec import verify as verify_lib
from specedge_jax.testing import tiny_models

VOCAB = 8
ALPHA = 1e-3
PROMPT = [1, 5, 2, 7]
ROOT = 3
LANES = 64
ROUNDS = 40  # LANES * ROUNDS samples per tree
SAMPLING_CASES = {
    "plain": sampling.SamplingParams(temperature=1.0),
    "top_k_top_p": sampling.SamplingParams(temperature=0.8, top_k=5, top_p=0.9),
}


@pytest.fixture(scope="module")
def models():
  return tiny_models.make_pair(VOCAB, sharpen=6.0, noise=0.05, seed=3)


def exact_next(model, sequences, params):
  """Processed next-token probabilities after each sequence: [len(sequences), V]."""
  length = len(sequences[0])
  logits, _ = model(jnp.asarray(sequences), jnp.broadcast_to(jnp.arange(length),
                                                             (len(sequences), length)),
                    causal_mask(jnp.full((len(sequences),), length), length))
  n = len(sequences)
  log_probs = sampling.processed_log_probs(
      logits[:, -1:], jnp.full((n,), params.temperature), jnp.full((n,), params.top_p),
      jnp.full((n,), params.top_k, jnp.int32))[:, 0]
  return np.asarray(jnp.exp(log_probs), np.float64)


def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
  counts, probs = counts.ravel().astype(np.float64), probs.ravel()
  total = counts.sum()
  chex.assert_trees_all_close(probs.sum(), 1.0, atol=1e-5)
  assert counts[probs == 0].sum() == 0, "a token with probability 0 was emitted"
  expected = probs * total
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  exp = exp * obs.sum() / exp.sum()
  return float(stats.chisquare(obs, exp).pvalue)


class VerifySampler:
  """Runs verification of one tree for many independent lanes from a fixed prefix."""

  def __init__(self, target, verify_fn):
    self.graphdef, self.state = split_model(target)
    self.verify_fn = verify_fn
    self.cache = kv.KVCache.init(target.config, LANES, 32)
    for lane in range(LANES):
      self.cache, _ = engine_prefill.prefill(self.graphdef, self.state, self.cache, lane, PROMPT, 0, (8,))

  def first_two(self, tokens, parents, params, seed):
    """[LANES * ROUNDS, 2] first two emitted tokens after the prefix and root."""
    n = len(tokens)
    capacity = 9
    out = []
    lanes = np.arange(LANES, dtype=np.int32)
    tree_tokens = np.zeros((LANES, capacity), np.int32)
    tree_parents = np.full((LANES, capacity), -1, np.int32)
    tree_tokens[:, :n], tree_parents[:, :n] = tokens, parents
    p = sampling.stack_params([params] * LANES)
    for r in range(ROUNDS):
      seeds = (seed * 100003 + r * LANES + lanes).astype(np.uint32)
      prefix = np.full(LANES, len(PROMPT), np.int32)
      self.cache, path, path_len, bonus, _ = self.verify_fn(
          self.graphdef, self.state, self.cache, lanes, prefix, tree_tokens, tree_parents,
          np.full(LANES, n, np.int32), p["temperature"], p["top_p"], p["top_k"], seeds,
          np.zeros(LANES, np.int32))
      path, path_len, bonus = (np.asarray(a) for a in (path, path_len, bonus))
      emitted = [[int(tree_tokens[b, i]) for i in path[b, 1:path_len[b]]] + [int(bonus[b])]
                 for b in range(LANES)]
      # Lanes that emitted one token get their second from a root-only round at step 1.
      roots = np.array([e[-1] for e in emitted], np.int32)
      self.cache, _, _, bonus2, _ = self.verify_fn(
          self.graphdef, self.state, self.cache, lanes, prefix + path_len,
          np.pad(roots[:, None], ((0, 0), (0, capacity - 1))), tree_parents * 0 - 1,
          np.ones(LANES, np.int32), p["temperature"], p["top_p"], p["top_k"], seeds,
          np.ones(LANES, np.int32))
      bonus2 = np.asarray(bonus2)
      for b in range(LANES):
        seq = emitted[b] if len(emitted[b]) >= 2 else emitted[b] + [int(bonus2[b])]
        out.append(seq[:2])
    return np.array(out)


def exact_first_two(target, params):
  p1 = exact_next(target, [PROMPT + [ROOT]], params)[0]
  p2 = exact_next(target, [PROMPT + [ROOT, t] for t in range(VOCAB)], params)
  return p1, p1[:, None] * p2


@st.composite
def random_trees(draw):
  """Trees of 1..9 nodes over the 8-token vocabulary, siblings distinct, parents first."""
  size = draw(st.integers(1, 9))
  tokens, parents = [ROOT], [-1]
  used = {0: set()}
  for i in range(1, size):
    parent = draw(st.integers(0, i - 1))
    free = sorted(set(range(VOCAB)) - used[parent])
    if not free:
      break
    token = draw(st.sampled_from(free))
    used[parent].add(token)
    used[i] = set()
    tokens.append(token)
    parents.append(parent)
  return np.array(tokens, np.int32), np.array(parents, np.int32)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SAMPLING_CASES))
@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=random_trees())
def test_verification_is_lossless_for_any_tree(models, case, tree):
  target, _ = models
  params = SAMPLING_CASES[case]
  sampler = VerifySampler(target, verify_lib.verify)
  samples = sampler.first_two(*tree, params, seed=len(tree[0]))
  p1, p12 = exact_first_two(target, params)
  first = np.bincount(samples[:, 0], minlength=VOCAB)
  pairs = np.zeros((VOCAB, VOCAB))
  np.add.at(pairs, (samples[:, 0], samples[:, 1]), 1)
  assert chi_square_pvalue(first, p1) > ALPHA
  assert chi_square_pvalue(pairs, p12) > ALPHA


def test_counter_lossy_verification_is_detected(models, monkeypatch):
  """One random draw shared by all nodes of a tree: marginals right, joint wrong."""
  target, _ = models
  params = SAMPLING_CASES["plain"]

  def shared_draw_sample_tokens(logits, keys, temperature, top_p, top_k):
    log_probs = sampling.processed_log_probs(logits, temperature, top_p, top_k)
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (logits.shape[-1],)))(keys)
    return jnp.argmax(log_probs + gumbel[:, None, :], axis=-1).astype(jnp.int32)

  monkeypatch.setattr(verify_lib.sampling, "sample_tokens", shared_draw_sample_tokens)
  # verify's unjitted body, traced afresh through a new function (jit caches traces by function
  # identity, and the real verify's trace holds the real sampler).
  def lossy_body(*args):
    return verify_lib.verify.__wrapped__(*args)

  lossy_verify = jax.jit(lossy_body, static_argnums=0, donate_argnums=2)
  # The root with every token as a child: the second token always comes from the tree.
  tokens = np.array([ROOT] + list(range(VOCAB)), np.int32)
  parents = np.array([-1] + [0] * VOCAB, np.int32)
  samples = VerifySampler(target, lossy_verify).first_two(tokens, parents, params, seed=7)
  p1, p12 = exact_first_two(target, params)
  first = np.bincount(samples[:, 0], minlength=VOCAB)
  pairs = np.zeros((VOCAB, VOCAB))
  np.add.at(pairs, (samples[:, 0], samples[:, 1]), 1)
  assert chi_square_pvalue(first, p1) > ALPHA  # the marginal alone cannot see the bug
  assert chi_square_pvalue(pairs, p12) < ALPHA  # the joint test does


@pytest.mark.slow
def test_end_to_end_sampled_continuations_match_target(models):
  target, draft = models
  params = SAMPLING_CASES["plain"]
  samples_count = 1024
  prompt = PROMPT
  # Exact distribution of the first three generated tokens.
  p1 = exact_next(target, [prompt], params)[0]
  p2 = exact_next(target, [prompt + [a] for a in range(VOCAB)], params)
  p3 = exact_next(target, [prompt + [a, b] for a, b in itertools.product(range(VOCAB),
                                                                         repeat=2)], params)
  exact = (p1[:, None, None] * p2[:, :, None] * p3.reshape(VOCAB, VOCAB, VOCAB))
  prompts = [prompt] * samples_count

  def histogram(tokens):
    counts = np.zeros((VOCAB,) * 3)
    for t in tokens:
      counts[tuple(t)] += 1
    return counts

  target_engine = E.TargetEngine(target, num_slots=16, max_len=32, max_tree_nodes=9,
                                 max_batch_size=16)
  plain = E.generate(target_engine, prompts, sampling=params, max_new_tokens=3, seed=1000)
  draft_engine = E.DraftEngine(
      draft, num_slots=16, max_len=32,
      tree=E.TreeParams(max_n_beams=4, max_beam_len=2, max_branch_width=3, max_budget=6))
  speculative = E.generate(target_engine, prompts, draft=draft_engine, sampling=params,
                           max_new_tokens=3, seed=5000)
  assert all(len(t) == 3 for t in speculative.tokens + plain.tokens)
  assert speculative.mean_accepted > 1.0  # speculation did accept draft tokens
  assert chi_square_pvalue(histogram(plain.tokens), exact) > ALPHA
  assert chi_square_pvalue(histogram(speculative.tokens), exact) > ALPHA
