"""Voting: combine M members' class probabilities into one table. Pure functions, arrays in, arrays out.

Members are M predictions of the same N rows (same order = same ids), given as a list of
N x C arrays or one M x N x C array. Every combiner returns an N x C array whose rows sum to 1
and contain no NaN, even when members hold exact zeros (probabilities are clipped to a small
epsilon before any logarithm). What learns from OOF (weights, stacking, offsets) is
``pipeline.ensembling.blending``.
"""

import numpy as np

EPSILON = 1e-15
# Stacking features are log-probabilities; a looser clip than EPSILON keeps an exact 0


def as_stack(members, name: str = "members") -> np.ndarray:
    """Members as a float M x N x C array, validated."""
    if isinstance(members, np.ndarray):
        stack = members.astype(float)
    else:
        members = [np.asarray(member, dtype=float) for member in members]
        if not members:
            raise ValueError(f"{name} is empty")
        shapes = {member.shape for member in members}
        if len(shapes) != 1:
            raise ValueError(f"{name} have different shapes: {sorted(shapes)}")
        stack = np.stack(members)
    if stack.ndim != 3 or 0 in stack.shape:
        raise ValueError(f"{name} must be M x N x C (M, N, C > 0), got shape {stack.shape}")
    if not np.all(np.isfinite(stack)):
        raise ValueError(f"{name} contain NaN or infinite values")
    if np.any(stack < 0):
        raise ValueError(f"{name} contain negative probabilities")
    return stack


def normalise_weights(weights, n_members: int) -> np.ndarray:
    """Weights as a length-M float array summing to 1 (uniform when None)."""
    if weights is None:
        return np.full(n_members, 1.0 / n_members)
    weights = np.asarray(weights, dtype=float)
    if weights.shape != (n_members,):
        raise ValueError(f"weights must have one entry per member ({n_members}), got shape {weights.shape}")
    if not np.all(np.isfinite(weights)):
        raise ValueError("weights contain NaN or infinite values")
    if np.any(weights < 0):
        raise ValueError(f"weights must be non-negative, got {weights.tolist()}")
    total = weights.sum()
    if total <= 0:
        raise ValueError("weights must not all be zero")
    return weights / total


def normalise_rows(proba: np.ndarray) -> np.ndarray:
    """Rows rescaled to sum 1; a row with no mass at all becomes uniform instead of NaN."""
    proba = np.maximum(proba, 0.0)
    totals = proba.sum(axis=1, keepdims=True)
    uniform = np.full_like(proba, 1.0 / proba.shape[1])
    return np.divide(proba, totals, out=uniform, where=totals > 0)


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    # By hand rather than scipy.special.softmax: the class-offset search calls it ~10^5 times on small arrays.
    exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def soft_vote(members, weights=None) -> np.ndarray:
    """(Weighted) mean of the member probabilities -> N x C."""
    stack = as_stack(members)
    weights = normalise_weights(weights, len(stack))
    return normalise_rows(np.tensordot(weights, stack, axes=1))


def geometric_mean(members, weights=None) -> np.ndarray:
    """(Weighted) mean of member log-probabilities, exponentiated and renormalised -> N x C."""
    stack = as_stack(members)
    weights = normalise_weights(weights, len(stack))
    log_proba = np.log(np.clip(stack, EPSILON, None))
    return softmax_rows(np.tensordot(weights, log_proba, axes=1))


def rank_average(members, weights=None) -> np.ndarray:
    """(Weighted) mean of per-class ranks among the N rows, rows normalised -> N x C.

    Each member's column is replaced by its average rank divided by N, so only the
    ordering of rows within a class matters. The result is a score for ranking
    and argmax, not calibrated probabilities; do not judge it by log loss.
    """
    import pandas as pd  # pandas' average ranks are scipy's rankdata: the code-competition kernel has no scipy

    stack = as_stack(members)
    weights = normalise_weights(weights, len(stack))
    ranks = np.stack([pd.DataFrame(member).rank(axis=0, method="average").to_numpy() for member in stack])
    ranks = ranks / stack.shape[1]
    return normalise_rows(np.tensordot(weights, ranks, axes=1))


def hard_vote(members, weights=None) -> np.ndarray:
    """Majority vote of member argmax classes -> one-hot N x C.

    Each member casts its weight (1 when weights is None) for its argmax class.
    Ties in votes go to the tied class with the larger summed (weighted)
    probability, and a remaining exact tie to the lowest class index.
    """
    stack = as_stack(members)
    n_members, n_rows, n_classes = stack.shape
    weights = np.ones(n_members) if weights is None else normalise_weights(weights, n_members)
    votes = np.zeros((n_rows, n_classes))
    rows = np.arange(n_rows)
    for member, weight in zip(stack, weights, strict=True):
        votes[rows, np.argmax(member, axis=1)] += weight
    # Tolerances absorb float noise in sums of weights (0.1 + 0.2 vs 0.3) so such ties stay ties.
    tied = votes >= votes.max(axis=1, keepdims=True) - 1e-12
    summed = np.where(tied, np.tensordot(weights, stack, axes=1), -np.inf)
    finalists = summed >= summed.max(axis=1, keepdims=True) - 1e-12
    winners = np.argmax(finalists, axis=1)  # first True = lowest index
    one_hot = np.zeros((n_rows, n_classes))
    one_hot[rows, winners] = 1.0
    return one_hot


def check_labels(y_true, n_rows: int, n_classes: int) -> np.ndarray:
    y_true = np.asarray(y_true)
    if y_true.shape != (n_rows,):
        raise ValueError(f"y_true must have one label per row ({n_rows}), got shape {y_true.shape}")
    if not np.issubdtype(y_true.dtype, np.integer):
        raise ValueError(f"y_true must hold integer labels, got dtype {y_true.dtype}")
    if y_true.min() < 0 or y_true.max() >= n_classes:
        raise ValueError(f"y_true labels must lie in 0..{n_classes - 1}")
    return y_true


