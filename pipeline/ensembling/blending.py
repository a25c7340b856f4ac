"""Blending: what learns from out-of-fold predictions how to combine members. Pure functions.

Weights (``fit_weights``, Caruana selection), a stacker (cross-fitted logistic regression) and
per-class offsets are learnt from OOF predictions and then applied unchanged to the test
predictions. ``run_method`` does both for each named method in ``METHODS``; ``best_of_scores``
chooses among them on OOF scores. The combiners themselves are ``pipeline.ensembling.voting``'s.
"""

import numpy as np

from pipeline import metrics
from pipeline.ensembling.voting import (
    EPSILON,
    as_stack,
    check_labels,
    geometric_mean,
    hard_vote,
    normalise_rows,
    rank_average,
    soft_vote,
    softmax_rows,
)

# from becoming an extreme feature value (-34.5) that dominates the regularised fit.
STACKING_EPSILON = 1e-6
# Default candidate offsets for fit_class_offsets; read-only because it is a shared default.
OFFSET_GRID = np.linspace(-2, 2, 41)
OFFSET_GRID.flags.writeable = False

METHODS = {
    "soft": "Unweighted mean of the member probabilities.",
    "weighted": "Weighted mean of the member probabilities, weights fit on OOF (fit_weights).",
    "hard": "Majority vote of the member argmax classes, as a one-hot matrix.",
    "geometric": "Normalised geometric mean of the member probabilities.",
    "rank": "Mean of per-class ranks, rows normalised (a score, not calibrated probabilities).",
    "caruana": "Greedy forward selection with replacement (Caruana et al. 2004) on OOF.",
    "stacking": "Multinomial logistic regression on member log-probabilities, cross-fitted.",
}


def _metric_key(metric: str, y_true, proba, log_loss_value: float):
    """Sort key (smaller is better): the metric in 'lower is better' form, then log loss."""
    value = metrics.score(metric, y_true, proba)
    return (-value if metrics.greater_is_better(metric) else value, log_loss_value)


def _fit_log_loss_weights(stack: np.ndarray, y_true: np.ndarray, n_restarts: int, seed: int) -> np.ndarray:
    """Simplex weights minimising the log loss of the soft vote (SLSQP, several starts)."""
    from scipy import optimize  # here and below, not above: the code-competition notebook applies offsets without it

    n_members = len(stack)
    true_class_proba = stack[:, np.arange(stack.shape[1]), y_true]  # M x N

    def loss_and_gradient(weights):
        mixture = np.maximum(weights @ true_class_proba, EPSILON)
        loss = -np.log(mixture).mean()
        gradient = -(true_class_proba / mixture).mean(axis=1)
        return loss, gradient

    random = np.random.default_rng(seed)
    starts = [np.full(n_members, 1.0 / n_members)]
    starts += list(random.dirichlet(np.ones(n_members), size=max(n_restarts - 1, 0)))
    best_weights, best_loss = starts[0], loss_and_gradient(starts[0])[0]
    for start in starts:
        result = optimize.minimize(
            loss_and_gradient,
            start,
            jac=True,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * n_members,
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
        )
        candidate = np.clip(result.x, 0.0, None)
        if candidate.sum() <= 0:
            continue
        candidate = candidate / candidate.sum()
        loss = loss_and_gradient(candidate)[0]
        if loss < best_loss:
            best_weights, best_loss = candidate, loss
    return best_weights


def _move_towards_member(weights: np.ndarray, member: int, share: float) -> np.ndarray:
    """Weights with `member` set to `share`, the others rescaled to fill 1 - share."""
    others = np.delete(weights, member)
    total = others.sum()
    others = others / total if total > 0 else np.full(len(others), 1.0 / len(others))
    return np.insert(others * (1.0 - share), member, share)


def fit_weights(oof_members, y_true, metric: str = "log_loss", n_restarts: int = 5, seed: int = 0) -> np.ndarray:
    """Non-negative soft-vote weights summing to 1 that optimise `metric` on OOF predictions.

    Log loss is smooth and convex in the weights, so it is minimised directly
    (SLSQP on the simplex from the uniform point and n_restarts - 1 random
    starts). Other metrics are step functions of the argmax; for them a
    coordinate search on the simplex starts from the log-loss solution, the
    uniform weights and random points, and accepts a move only when it strictly
    improves (metric, then log loss), which keeps the result stable.
    Deterministic for a given seed. Returns a length-M array.
    """
    stack = as_stack(oof_members, "oof_members")
    n_members, n_rows, n_classes = stack.shape
    y_true = check_labels(y_true, n_rows, n_classes)
    metrics.greater_is_better(metric)  # rejects unknown names before any work
    if n_members == 1:
        return np.ones(1)
    log_loss_weights = _fit_log_loss_weights(stack, y_true, n_restarts, seed)
    if metric == "log_loss":
        return log_loss_weights

    def key(weights):
        # Direct mixture instead of soft_vote: the search evaluates thousands of candidates
        # and the input validation would dominate.
        proba = normalise_rows(np.tensordot(weights, stack, axes=1))
        return _metric_key(metric, y_true, proba, metrics.log_loss(y_true, proba))

    random = np.random.default_rng(seed + 1)
    starts = [log_loss_weights, np.full(n_members, 1.0 / n_members)]
    starts += list(random.dirichlet(np.ones(n_members), size=max(n_restarts - 2, 0)))
    shares = np.linspace(0.0, 1.0, 21)
    best_weights, best_key = None, None
    for weights in starts:
        current_key = key(weights)
        for _ in range(3):
            improved = False
            for member in range(n_members):
                for share in shares:
                    candidate = _move_towards_member(weights, member, share)
                    candidate_key = key(candidate)
                    if candidate_key < current_key:
                        weights, current_key, improved = candidate, candidate_key, True
            if not improved:
                break
        if best_key is None or current_key < best_key:
            best_weights, best_key = weights, current_key
    return best_weights


def caruana_selection(oof_members, y_true, metric: str, n_iterations: int = 50, init_best: int = 1) -> np.ndarray:
    """Greedy forward ensemble selection with replacement (Caruana et al. 2004).

    Starts from the `init_best` best single members, then `n_iterations` times
    adds (with replacement) the member whose addition gives the best metric of
    the soft vote; ties go to the lowest member index. Returns the selection
    counts divided by their total (length M, sums to 1).
    """
    stack = as_stack(oof_members, "oof_members")
    n_members, n_rows, n_classes = stack.shape
    y_true = check_labels(y_true, n_rows, n_classes)
    if not 1 <= init_best <= n_members:
        raise ValueError(f"init_best must lie in 1..{n_members} (number of members), got {init_best}")
    if n_iterations < 0:
        raise ValueError(f"n_iterations must be >= 0, got {n_iterations}")
    sign = -1.0 if metrics.greater_is_better(metric) else 1.0
    single_scores = np.array([sign * metrics.score(metric, y_true, member) for member in stack])
    counts = np.zeros(n_members)
    counts[np.argsort(single_scores, kind="stable")[:init_best]] = 1
    running_sum = np.tensordot(counts, stack, axes=1)
    for _ in range(n_iterations):
        total = counts.sum() + 1
        best_member, best_score = 0, None
        for member in range(n_members):
            value = metrics.score(metric, y_true, normalise_rows((running_sum + stack[member]) / total))
            if best_score is None or metrics.better(metric, value, best_score):
                best_member, best_score = member, value
        counts[best_member] += 1
        running_sum += stack[best_member]
    return counts / counts.sum()


def _stacking_features(stack: np.ndarray) -> np.ndarray:
    """N x (M*C) features: member log-probabilities side by side.

    Log-probabilities make the linear stacker a learned, class-aware weighted
    geometric mean, which is what combining calibrated members calls for; raw
    probabilities saturate near 0 and 1, exactly where members disagree most.
    """
    log_proba = np.log(np.clip(stack, STACKING_EPSILON, None))
    return np.concatenate(list(log_proba), axis=1)


def _fit_predict_logistic(train_x, train_y, predict_x, n_classes: int, C: float, seed: int) -> np.ndarray:
    """Fit a multinomial logistic regression and predict all n_classes columns."""
    present = np.unique(train_y)
    full = np.zeros((len(predict_x), n_classes))
    if len(present) == 1:
        # LogisticRegression refuses a single class; that class is then the only prediction.
        full[:, present[0]] = 1.0
    else:
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=C, max_iter=2000, random_state=seed)
        model.fit(train_x, train_y)
        full[:, model.classes_] = model.predict_proba(predict_x)
    # Classes unseen in training keep (almost) zero mass, never an exact 0 that breaks logs later.
    return normalise_rows(full + EPSILON)


def stacking_oof(oof_members, y_true, folds, C: float = 1.0, seed: int = 0):
    """Cross-fitted stacker predictions -> (N x C OOF probabilities, parameters dict).

    A multinomial logistic regression on member log-probabilities is fitted on
    the rows with fold != k and predicts the rows with fold == k, for each fold k
    of the same `folds` assignment (length-N ints) that produced the OOF members,
    so no row is predicted by a model that saw its label and the OOF score is honest.
    """
    stack = as_stack(oof_members, "oof_members")
    _, n_rows, n_classes = stack.shape
    y_true = check_labels(y_true, n_rows, n_classes)
    folds = np.asarray(folds)
    if folds.shape != (n_rows,):
        raise ValueError(f"folds must have one fold id per row ({n_rows}), got shape {folds.shape}")
    fold_ids = np.unique(folds)
    if len(fold_ids) < 2:
        raise ValueError(f"folds must hold at least 2 distinct fold ids, got {fold_ids.tolist()}")
    features = _stacking_features(stack)
    oof = np.zeros((n_rows, n_classes))
    for fold in fold_ids:
        held_out = folds == fold
        oof[held_out] = _fit_predict_logistic(
            features[~held_out], y_true[~held_out], features[held_out], n_classes, C, seed
        )
    parameters = {"model": "LogisticRegression", "features": "log_proba", "C": C, "seed": seed,
                  "n_folds": len(fold_ids)}
    return oof, parameters


def stacking_fit_predict(oof_members, y_true, test_members, C: float = 1.0, seed: int = 0) -> np.ndarray:
    """Fit the stacker on all OOF rows and predict the test members -> Nt x C."""
    stack = as_stack(oof_members, "oof_members")
    test_stack = as_stack(test_members, "test_members")
    _check_same_members(stack, test_stack)
    _, n_rows, n_classes = stack.shape
    y_true = check_labels(y_true, n_rows, n_classes)
    return _fit_predict_logistic(
        _stacking_features(stack), y_true, _stacking_features(test_stack), n_classes, C, seed
    )


def apply_class_offsets(proba, offsets) -> np.ndarray:
    """Softmax of log(proba) + offsets (length C) -> N x C."""
    proba = np.asarray(proba, dtype=float)
    offsets = np.asarray(offsets, dtype=float)
    if proba.ndim != 2 or offsets.shape != (proba.shape[1],):
        raise ValueError(
            f"offsets must have one entry per class of an N x C proba, got proba {proba.shape}, "
            f"offsets {offsets.shape}"
        )
    return softmax_rows(np.log(np.clip(proba, EPSILON, None)) + offsets)


def fit_class_offsets(proba, y_true, metric: str = "macro_f1", n_rounds: int = 3,
                      grid=OFFSET_GRID) -> np.ndarray:
    """Per-class additive log-probability offsets (length C) that improve `metric`.

    Coordinate ascent: one class at a time, the grid value giving a strictly
    better metric is taken (the smallest |offset| among equals), for up to
    n_rounds rounds. Starting from zeros and accepting only strict improvements,
    it never makes the score on `proba` worse. Fit on OOF predictions, then
    apply the same offsets to test predictions with apply_class_offsets.
    """
    proba = np.asarray(proba, dtype=float)
    if proba.ndim != 2:
        raise ValueError(f"proba must be a 2-D N x C array, got shape {proba.shape}")
    y_true = check_labels(y_true, *proba.shape)
    # Smallest moves first, so among equally good values the gentlest wins.
    grid = np.asarray(grid, dtype=float)
    grid = grid[np.argsort(np.abs(grid), kind="stable")]
    offsets = np.zeros(proba.shape[1])
    best = metrics.score(metric, y_true, proba)
    log_proba = np.log(np.clip(proba, EPSILON, None))  # apply_class_offsets' first step, once
    for _ in range(n_rounds):
        improved = False
        for class_index in range(proba.shape[1]):
            for value in grid:
                candidate = offsets.copy()
                candidate[class_index] = value
                candidate_score = metrics.score(metric, y_true, softmax_rows(log_proba + candidate))
                if metrics.better(metric, candidate_score, best):
                    offsets, best, improved = candidate, candidate_score, True
        if not improved:
            break
    return offsets


def _check_same_members(stack: np.ndarray, test_stack: np.ndarray) -> None:
    if test_stack.shape[0] != stack.shape[0] or test_stack.shape[2] != stack.shape[2]:
        raise ValueError(
            f"test_members must have the same number of members and classes as oof_members: "
            f"got {test_stack.shape} vs {stack.shape}"
        )


def cross_fit(fit, apply, oof, y_true, folds) -> np.ndarray:
    """Honest OOF of something learnt from OOF: each fold's rows get ``apply(rows, fit(other folds' rows))``.

    ``oof`` is M x N x C (members; rows are axis 1) or N x C (one prediction); ``fit(oof_part, y_part)
    -> params`` and ``apply(oof_part, params) -> rows x C`` take the same kind of part. A row is never
    scored by parameters that saw it, as with stacking.
    """
    folds = np.asarray(folds)
    members = oof.ndim == 3
    rows = oof.shape[1] if members else oof.shape[0]
    if folds.shape != (rows,):
        raise ValueError(f"folds must have one entry per OOF row ({rows}), got shape {folds.shape}")
    if len(np.unique(folds)) < 2:
        raise ValueError("cross-fitting needs at least 2 folds")
    result = np.empty((rows, oof.shape[-1]))
    for fold in np.unique(folds):
        held = folds == fold
        train_part = oof[:, ~held] if members else oof[~held]
        held_part = oof[:, held] if members else oof[held]
        result[held] = apply(held_part, fit(train_part, y_true[~held]))
    return result


def run_method(name: str, oof_members, y_true, folds, test_members, metric: str) -> dict:
    """OOF and test predictions of one ensembling method -> {"oof", "test", "weights"}.

    `weights` is a list for `weighted` and `caruana`, else None. Their test weights are fit on all
    OOF rows; their OOF is cross-fitted (each fold blended with weights fit on the other folds),
    so every method's OOF score is honest and `auto` compares like with like. `stacking` is
    cross-fitted the same way. The other methods learn nothing. `rank` ranks test rows among the
    test rows.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    metrics.greater_is_better(metric)  # rejects unknown metric names before any work
    stack = as_stack(oof_members, "oof_members")
    test_stack = as_stack(test_members, "test_members")
    _check_same_members(stack, test_stack)
    y_true = check_labels(y_true, stack.shape[1], stack.shape[2])
    if name in ("weighted", "caruana"):
        def fit(part, labels):
            return fit_weights(part, labels, metric) if name == "weighted" else caruana_selection(part, labels, metric)

        weights = fit(stack, y_true)
        return {"oof": cross_fit(fit, soft_vote, stack, y_true, folds), "test": soft_vote(test_stack, weights),
                "weights": weights.tolist()}
    if name == "stacking":
        oof, _ = stacking_oof(stack, y_true, folds)
        return {"oof": oof, "test": stacking_fit_predict(stack, y_true, test_stack), "weights": None}
    vote = {"soft": soft_vote, "hard": hard_vote, "geometric": geometric_mean, "rank": rank_average}[name]
    return {"oof": vote(stack), "test": vote(test_stack), "weights": None}


def best_of_scores(scores: dict, metric: str) -> str:
    """Name of the best-scoring method under the metric's direction.

    Ties go to the method listed first in METHODS, so the simpler one wins.
    NaN scores are ignored.
    """
    metrics.greater_is_better(metric)  # rejects unknown metric names
    unknown = [name for name in scores if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid methods: {', '.join(METHODS)}")
    best_name, best_score = None, None
    for name in METHODS:
        if name not in scores or np.isnan(scores[name]):
            continue
        if best_name is None or metrics.better(metric, scores[name], best_score):
            best_name, best_score = name, scores[name]
    if best_name is None:
        raise ValueError("scores holds no finite score to select from")
    return best_name
