"""Softmax entropy from logits, in numpy: the edge's only per-sample statistic.

``E(x) = -sum_c softmax(z)_c * log softmax(z)_c`` (natural log), computed through a stable log-softmax so that
finite logits of any magnitude give finite values in ``[0, ln C]``. A row with a NaN or ``+inf`` logit (or only
``-inf`` logits) has no defined softmax and gets entropy NaN, never a plausible number; ``-inf`` entries in an
otherwise finite row are masked classes and are fine.
"""

from __future__ import annotations

import numpy as np

__all__ = ["entropy_of_mean", "log_softmax", "softmax", "softmax_entropy"]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of ``[N, C]`` logits in float64 (max-shifted, so no overflow)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be [N, C], got shape {list(z.shape)}")
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf -> NaN is the documented result
        shifted = z - z.max(axis=1, keepdims=True)
        out: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax probabilities ``[N, C]`` in float64."""
    out: np.ndarray = np.exp(log_softmax(logits))
    return out


def softmax_entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy of each row's softmax, natural log, float64 ``[N]`` (``N = 0`` gives an empty array).

    Example:
        >>> float(softmax_entropy(np.zeros((1, 4)))[0]) == float(np.log(4))
        True
    """
    logp = log_softmax(logits)
    # p * log p with p == 0 (log p == -inf after underflow) contributes 0, not NaN.
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0.0, p * logp, 0.0)
    out: np.ndarray = np.maximum(-terms.sum(axis=1), 0.0)
    out[np.isnan(logp).any(axis=1)] = np.nan  # NaN/+inf logits: undefined, and must not look confident
    return out


def entropy_of_mean(probs: np.ndarray) -> float:
    """``H(mean_i p_i)``, natural log: the entropy of a batch's mean prediction over the rows of probabilities
    ``[N, C]`` (ln C when they spread evenly over the classes, 0 when every row is the same one-hot). Classes
    with mean probability 0 contribute 0. Used by the shift detector (``exp`` of it: the effective number of
    classes) and by the rollback rule (mutual information ``H(mean p) - mean H(p)``).

    Example:
        >>> round(entropy_of_mean(np.eye(4)), 6) == round(float(np.log(4)), 6)
        True
    """
    pm = np.asarray(probs, dtype=np.float64).mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(pm > 0.0, pm * np.log(pm), 0.0)
    return float(-terms.sum())
