"""The score arithmetic against cases computed by hand (logits we choose, so the answers are known)."""
import math

import numpy as np
import pytest

from engine.metrics import Window, kl_and_top1, log_softmax, make_windows, nll, perplexity, scored_logprobs


def test_windows_disjoint_with_bos():
    windows = make_windows(list(range(10, 20)), window=4, stride=4, max_windows=10, bos_id=1)
    assert [w.input_ids for w in windows] == [[1, 10, 11, 12, 13], [1, 14, 15, 16, 17], [1, 18, 19]]
    assert [w.targets.tolist() for w in windows] == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19]]


def test_windows_without_bos_leave_the_first_token_as_context():
    windows = make_windows(list(range(8)), window=4, stride=4, max_windows=10, bos_id=None)
    assert [w.targets.tolist() for w in windows] == [[1, 2, 3], [5, 6, 7]]


def test_sliding_windows_score_each_token_once():
    ids = list(range(100, 112))
    windows = make_windows(ids, window=6, stride=3, max_windows=10, bos_id=0)
    scored = [t for w in windows for t in w.targets.tolist()]
    assert scored == ids  # every token exactly once, in order
    assert windows[1].input_ids == [0, 103, 104, 105, 106, 107, 108] and windows[1].targets.tolist() == [106, 107, 108]
    assert len(make_windows(ids, 6, 3, max_windows=2, bos_id=0)) == 2


def test_uniform_logits_give_perplexity_equal_to_vocab_size():
    vocab = 7
    window = Window([0, 1, 2, 3], 0)
    logprobs = scored_logprobs(np.zeros((4, vocab)), window)
    assert logprobs.shape == (3, vocab)
    assert perplexity(nll(logprobs, window.targets), 3) == pytest.approx(vocab)


def test_nll_of_a_known_distribution():
    # two positions; the target gets probability 1/2 then 1/4
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]]))
    total = nll(log_softmax(logits), np.array([0, 0]))
    assert total == pytest.approx(-math.log(0.5) - math.log(0.25))
    assert perplexity(total, 2) == pytest.approx(math.sqrt(8))


def test_kl_and_top1_by_hand():
    p = np.log(np.array([[0.5, 0.5], [0.9, 0.1]]))
    q = np.log(np.array([[0.25, 0.75], [0.6, 0.4]]))
    kl, agree = kl_and_top1(p, q)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4)
    assert kl == pytest.approx(expected)
    assert agree == 1  # row 0: argmax 0 vs 1 (tie broken to 0 in p); row 1: both 0
    assert kl_and_top1(p, p) == (pytest.approx(0.0), 2)


def test_log_softmax_is_shift_invariant_and_stable():
    x = np.array([[1000.0, 1001.0, 1002.0]])
    assert np.allclose(log_softmax(x), log_softmax(x - 1000.0))
    assert np.isfinite(log_softmax(x)).all()
