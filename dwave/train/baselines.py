"""What a WaveNet must beat: two simple code models of the same store, in bits per sample.

* unigram: the code histogram of the training tracks, p(x_t). The loss of the best model that
  ignores context.
* bigram: p(x_t | x_{t-1}) counted on the training tracks. The loss of the best model that
  sees one sample of context; real music at 16 kHz is very smooth, so this is already far below
  the histogram. A WaveNet sees a receptive field of thousands of samples: if it is not below
  the bigram after a few hundred steps, it is broken, not slow.

Both use add-one (Laplace) smoothing, so a code never seen in training costs a finite amount,
and both are evaluated on exactly the targets the model's validation loss reads (the codes
after the receptive field of each validation window, each with the code before it), so the
three numbers compare like with like. Pure numpy: no TensorFlow here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# Counting pairs needs quantization_channels^2 counters (8 bytes each): 4096 codes are 134 MB.
# Beyond that the bigram is not computed (reported as NaN).
MAX_BIGRAM_CODES = 4096


@dataclass(frozen=True)
class CodeCounts:
    """Counts of codes and of consecutive code pairs over some tracks."""

    quantization_channels: int  # Q: how many codes there are (the output distribution's)
    unigram: np.ndarray  # (Q,) int64
    bigram: np.ndarray | None  # (Q, Q) int64: [previous, next]; None above MAX_BIGRAM_CODES

    @property
    def samples(self) -> int:
        return int(self.unigram.sum())


def count_codes(tracks: Iterable[np.ndarray], quantization_channels: int) -> CodeCounts:
    """Counts over `tracks` (1-D code arrays). Pairs are counted within a track only, never
    across the end of one track and the start of the next."""
    Q = quantization_channels
    unigram = np.zeros(Q, np.int64)
    bigram = np.zeros(Q * Q, np.int64) if Q <= MAX_BIGRAM_CODES else None
    for codes in tracks:
        codes = np.asarray(codes)
        unigram += np.bincount(codes, minlength=Q)
        if bigram is not None and codes.size > 1:
            pairs = codes[:-1].astype(np.int64) * Q + codes[1:]
            bigram += np.bincount(pairs, minlength=Q * Q)
    return CodeCounts(Q, unigram, None if bigram is None else bigram.reshape(Q, Q))


def unigram_bits(counts: CodeCounts, targets: np.ndarray) -> float:
    """Mean cost in bits of `targets` under the add-one-smoothed code histogram."""
    targets = np.asarray(targets).ravel()
    log_p = np.log2(counts.unigram + 1.0) - math.log2(counts.samples + counts.quantization_channels)
    return float(-log_p[targets].mean())


def bigram_bits(counts: CodeCounts, previous: np.ndarray, targets: np.ndarray) -> float:
    """Mean cost in bits of each target given the code before it, under add-one-smoothed
    pair counts. NaN when there are too many codes to count pairs."""
    if counts.bigram is None:
        return math.nan
    previous, targets = np.asarray(previous).ravel(), np.asarray(targets).ravel()
    pair = counts.bigram[previous, targets] + 1.0
    row = counts.bigram.sum(axis=1)[previous] + counts.quantization_channels
    return float(-(np.log2(pair) - np.log2(row)).mean())


@dataclass(frozen=True)
class Baselines:
    """The two baselines' validation loss in bits per sample, and what they were fitted on."""

    unigram_bits: float
    bigram_bits: float
    fitted_samples: int  # training samples counted

    def to_dict(self) -> dict:
        return {"unigram_bits": self.unigram_bits, "bigram_bits": self.bigram_bits,
                "fitted_samples": self.fitted_samples}


def evaluate(counts: CodeCounts, windows: Iterable[np.ndarray], receptive_field: int) -> Baselines:
    """Both baselines on validation windows (each (batch, receptive_field + predicted)): the
    targets are codes[:, receptive_field:], as in the model's loss."""
    previous, targets = [], []
    for codes in windows:
        codes = np.asarray(codes)
        targets.append(codes[:, receptive_field:])
        previous.append(codes[:, receptive_field - 1:-1])
    targets, previous = np.concatenate(targets, axis=None), np.concatenate(previous, axis=None)
    return Baselines(unigram_bits(counts, targets), bigram_bits(counts, previous, targets),
                     counts.samples)
