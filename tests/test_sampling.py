"""`Sampling` against closed-form expectations: seeded draws follow softmax(z / T) (total variation
bound, and far from softmax(z) when T != 1), top-k and top-p never return an excluded id and keep
the renormalised probabilities of the ids they keep; generation_config's sampling defaults reach
the sampler through LLM.sampling and change what generate() produces."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_checkpoint
from edgert.generate import Sampling

DRAWS = 20000
# with 20k draws over <= 8 outcomes the empirical total variation is ~0.01 (3 sigma < 0.02);
# softmax(z/T) at T = 0.5 or 2 lies >= 0.1 from softmax(z) for the logits below
TV_BOUND = 0.02


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def empirical(sampler, logits, n=DRAWS) -> np.ndarray:
    return np.bincount([sampler(logits) for _ in range(n)], minlength=logits.size) / n


def tv(p, q) -> float:
    return 0.5 * float(np.abs(p - q).sum())


LOGITS = np.array([2.0, 1.2, 0.5, 0.0, -0.7, -1.5])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_follows_softmax_over_t(temperature):
    got = empirical(Sampling(temperature, seed=11), LOGITS)
    want = softmax(LOGITS / temperature)
    assert tv(got, want) < TV_BOUND, (got, want)
    if temperature != 1.0:
        assert tv(softmax(LOGITS), want) > 5 * TV_BOUND          # the check tells the temperatures apart
        assert tv(got, softmax(LOGITS)) > 4 * TV_BOUND


def test_greedy_and_seeds():
    assert Sampling(0.0)(LOGITS) == 0 and Sampling(0.0)(LOGITS[::-1].copy()) == LOGITS.size - 1
    a, b, c = Sampling(1.0, seed=7), Sampling(1.0, seed=7), Sampling(1.0, seed=8)
    ra, rb, rc = ([s(LOGITS) for _ in range(200)] for s in (a, b, c))
    assert ra == rb and ra != rc


@pytest.mark.parametrize("top_k,temperature", [(1, 1.0), (2, 1.0), (3, 0.7), (4, 2.0)])
def test_top_k_keeps_the_k_best_with_their_renormalised_probabilities(top_k, temperature):
    logits = LOGITS[[3, 0, 5, 1, 4, 2]]                      # the best ids are not the first ones
    keep = np.argsort(-logits)[:top_k]
    got = empirical(Sampling(temperature, top_k=top_k, seed=3), logits)
    assert set(np.flatnonzero(got)) <= set(keep)
    want = np.zeros_like(logits)
    want[keep] = softmax(logits[keep] / temperature)
    assert tv(got, want) < TV_BOUND


def _nucleus(p, top_p) -> np.ndarray:
    """The smallest most-likely set whose mass reaches top_p, written out one id at a time."""
    order, kept, mass = np.argsort(-p, kind="stable"), [], 0.0
    for i in order:
        kept.append(int(i))
        mass += p[i]
        if mass >= top_p:
            break
    return np.array(kept)


@pytest.mark.parametrize("vocab,spread", [(6, None), (2000, 4.0), (2000, 0.3)])
@pytest.mark.parametrize("top_p", [0.5, 0.8, 0.95])
def test_top_p_never_leaves_the_nucleus(vocab, spread, top_p):
    """Small vocabularies (a full sort); large ones: test_nucleus_of_a_large_vocabulary_is_the_full_sorts."""
    rng = np.random.default_rng(vocab + int(100 * top_p))
    logits = LOGITS if spread is None else rng.normal(0, spread, vocab)
    temperature = 0.8
    p = softmax(logits / temperature)
    keep = _nucleus(p, top_p)
    n = 4000 if vocab > 6 else DRAWS
    got = empirical(Sampling(temperature, top_p=top_p, seed=5), logits, n)
    assert set(np.flatnonzero(got)) <= set(keep.tolist())
    if keep.size <= 8:
        want = np.zeros_like(p)
        want[keep] = p[keep] / p[keep].sum()
        assert tv(got, want) < TV_BOUND * (np.sqrt(DRAWS / n))


def test_top_k_and_top_p_together():
    s = Sampling(1.0, top_k=4, top_p=0.6, seed=0)
    p4 = softmax(np.sort(LOGITS)[::-1][:4])
    keep = _nucleus(p4, 0.6)                                  # the nucleus of the top-4 distribution
    got = empirical(s, LOGITS, 5000)
    assert set(np.flatnonzero(got)) == set(keep.tolist())


VOCAB = 151_936       # Qwen2's: where a draw's arithmetic is worth its scratch arrays


@pytest.mark.parametrize("vocab,temperature", [(6, 1.0), (VOCAB, 1.0), (VOCAB, 0.6)])
def test_draws_are_numpy_choices_with_the_same_seed(vocab, temperature):
    """The sampler repeats rng.choice(p=softmax(z / T))'s cumulative-sum search in arrays it keeps
    (without choice's checks of p): token for token the same draws from the same seed."""
    rng = np.random.default_rng(1)
    s, ref = Sampling(temperature, seed=9), np.random.default_rng(9)
    for _ in range(40 if vocab > 6 else 400):
        z = rng.normal(0, 3, vocab).astype(np.float32)
        assert s(z) == int(ref.choice(vocab, p=softmax(z.astype(np.float64) / temperature)))


@pytest.mark.parametrize("case", ["peaked", "thin head", "flat"])
@pytest.mark.parametrize("top_p", [0.5, 0.95])
def test_nucleus_of_a_large_vocabulary_is_the_full_sorts(case, top_p):
    """_nucleus sorts only the ids at least a millionth as likely as the best, when those hold top_p:
    a peaked distribution (that path); one whose likely ids hold 0.9 and whose 152k others, each
    below a millionth of the best, the rest (below 0.95 the head is not the nucleus); a flat one."""
    rng = np.random.default_rng(2)
    if case == "peaked":
        logits = rng.normal(0, 1, VOCAB)
        logits[rng.choice(VOCAB, 40, replace=False)] += rng.uniform(8, 16, 40)
        p = softmax(logits)
    elif case == "thin head":
        p = rng.uniform(0.8, 1.2, VOCAB)
        p *= 0.1 / p.sum()
        p[[7, 90_000]] = [0.85, 0.05]
    else:
        p = softmax(rng.normal(0, 0.5, VOCAB))
    got = Sampling(1.0, top_p=top_p)._nucleus(p)
    want = _nucleus(p, top_p)
    assert set(got.tolist()) == set(want.tolist())
    assert np.all(np.diff(p[got]) <= 0)                      # most likely first


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.0, 1.0), (1.0, 0.9)])
def test_log_probabilities_are_log_softmax_whatever_was_drawn_before(temperature, top_p):
    """A vote's log-probability (Decoding(logprobs=True)) is log softmax(z)[token] at temperature 1,
    computed in the sampler's scratch arrays, which the previous draw (other logits, another
    temperature) and a smaller vocabulary before it must not leak into; the arrays are kept. At
    temperature 1 (no top-k) the draw's own sum of exp is the normaliser, reused only for the
    logits drawn from: asked for other logits right after a draw, it is computed afresh."""
    from edgert.generate import Decoding
    rng = np.random.default_rng(3)
    s = Sampling(temperature, top_p=top_p, seed=1)
    s(rng.normal(0, 1, 6).astype(np.float32))
    dec = Decoding([1, 2], 10, s, logprobs=True)
    arrays = set()

    def log_softmax(x):
        x = x.astype(np.float64) - x.max()
        return x - np.log(np.exp(x).sum())
    for _ in range(5):
        z = rng.normal(0, 4, VOCAB).astype(np.float32)
        step = dec.next(z)
        assert dec.logprobs[-1] == pytest.approx(log_softmax(z)[step.id], abs=1e-9)
        arrays.add(id(s._z))
        other = rng.normal(0, 4, VOCAB).astype(np.float32)
        s(z)
        assert s.logprob(other, 5) == pytest.approx(log_softmax(other)[5], abs=1e-9)
    assert len(arrays) == 1


@pytest.mark.parametrize("vocab", [6, 2049, VOCAB])
def test_the_two_level_search_is_the_cumulative_sums_and_skips_empty_ids(vocab):
    """_inverse_cdf (chunk sums, then the chunk) returns what one cumulative sum over every id
    returns, at chunk boundaries too, and never an id of mass 0: not at u = 0, not at u = the total
    (rounding may put a draw there), not where whole chunks are empty (top-k)."""
    rng = np.random.default_rng(vocab)
    p = rng.uniform(0, 1, vocab)
    p[rng.random(vocab) < 0.3] = 0.0
    p[:2] = p[-2:] = 0.0
    p[3] = 0.5
    if vocab > 4096:
        p[1024:3072] = 0.0                                   # two empty chunks
    s = Sampling(1.0)
    run = np.cumsum(p)
    nonzero = np.flatnonzero(p)
    for u in [0.0, run[-1], np.nextafter(run[-1], 2 * run[-1]), *run[nonzero[:20]], *(rng.random(200) * run[-1])]:
        got = s._inverse_cdf(p, float(u))
        assert p[got] > 0
        want = min(int(run.searchsorted(u, side="right")), int(nonzero[-1]))
        assert got == want, (u, got, want)
    k = Sampling(1.0, top_k=3, seed=0)
    logits = rng.normal(0, 1, vocab).astype(np.float32)
    best = set(np.argsort(-logits)[:3].tolist())
    assert {k(logits) for _ in range(300)} <= best


@pytest.fixture(scope="module")
def sampling_artifact(tmp_path_factory, exported):
    """A tiny model whose generation_config asks for sampling, as Qwen3's and R1-Distill's do."""
    src = make_checkpoint(tmp_path_factory.mktemp("gen") / "hf", "llama")
    (src / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}))
    return exported(src, 8)


def test_generation_config_defaults_reach_the_sampler(sampling_artifact):
    import edgert
    from edgert.generate import generate
    llm = edgert.load(sampling_artifact)
    s = llm.sampling()
    assert (s.temperature, s.top_p, s.top_k) == (0.6, 0.95, 20)
    s = llm.sampling(temperature=0.0, top_k=5)                # explicit options win, the rest stay
    assert (s.temperature, s.top_p, s.top_k) == (0.0, 0.95, 5)
    ids = llm.encode("Once upon a time", raw=True)
    # generate() with nothing set draws exactly what Sampling(0.6, 0.95, 20) draws with that seed
    got = [t.id for t in llm.generate(ids, max_tokens=24, seed=3, ignore_eos=True)]
    want = [st.id for st in generate(llm.model, ids, 24, Sampling(0.6, 0.95, 20, seed=3))]
    assert got == want
    greedy = [t.id for t in llm.generate(ids, max_tokens=24, temperature=0, ignore_eos=True)]
    assert got != greedy                                      # the defaults did sample
    hot = [t.id for t in llm.generate(ids, max_tokens=24, seed=3, temperature=1.5, top_k=0, top_p=1.0, ignore_eos=True)]
    assert hot != got


def test_no_sampling_defaults_means_greedy(exported, tmp_path):
    import edgert
    src = make_checkpoint(tmp_path / "hf", "llama")
    llm = edgert.load(exported(src, 8))            # generation_config: do_sample false
    s = llm.sampling()
    assert (s.temperature, s.top_p, s.top_k) == (0.0, 1.0, 0)
