"""The learning baselines against brute-force counting, and on a real store."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dwave.train.baselines import bigram_bits, count_codes, evaluate, unigram_bits


def brute_force(tracks, quantization_channels, previous, targets):
    uni = np.ones(quantization_channels)
    pairs = np.ones((quantization_channels, quantization_channels))
    for t in tracks:
        for a in t:
            uni[a] += 1
        for a, b in zip(t[:-1], t[1:]):
            pairs[a, b] += 1
    p_uni = uni / uni.sum()
    p_pair = pairs / pairs.sum(axis=1, keepdims=True)
    return (-np.mean([math.log2(p_uni[x]) for x in targets]),
            -np.mean([math.log2(p_pair[a, b]) for a, b in zip(previous, targets)]))


def test_counts_and_bits_equal_brute_force_and_pairs_stay_within_a_track():
    rng = np.random.default_rng(0)
    quantization_channels = 8
    tracks = [rng.integers(0, quantization_channels, n).astype(np.uint8) for n in (50, 1, 31)]
    counts = count_codes(tracks, quantization_channels)
    assert counts.samples == 82 and counts.bigram.sum() == 49 + 0 + 30  # no cross-track pair
    previous = rng.integers(0, quantization_channels, 40)
    targets = rng.integers(0, quantization_channels, 40)
    uni, bi = brute_force(tracks, quantization_channels, previous, targets)
    assert unigram_bits(counts, targets) == pytest.approx(uni, rel=1e-12)
    assert bigram_bits(counts, previous, targets) == pytest.approx(bi, rel=1e-12)


def test_evaluate_scores_the_targets_after_the_receptive_field():
    quantization_channels, rf = 4, 3
    counts = count_codes([np.array([0, 1, 2, 3] * 20)], quantization_channels)  # 0->1->2->3->0...
    windows = [np.array([[3, 3, 3, 0, 1, 2, 3]])]  # targets 0,1,2,3 after 3,0,1,2: all seen
    result = evaluate(counts, windows, rf)
    # 3 -> 0 was seen 19 times (row 3: 19 pairs), the other three pairs 20 times in 20.
    assert result.bigram_bits == pytest.approx(
        np.mean([-math.log2((19 + 1) / (19 + 4))] + [-math.log2((20 + 1) / (20 + 4))] * 3))
    assert result.unigram_bits == pytest.approx(-math.log2(21 / 84))
    assert result.fitted_samples == 80


def test_a_bigram_of_many_levels_is_not_counted():
    counts = count_codes([np.arange(5000, dtype=np.uint16)], 65536)
    assert counts.bigram is None
    assert math.isnan(bigram_bits(counts, [1], [2]))
