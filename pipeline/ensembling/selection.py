"""Choosing an ensembling method on OOF, and the honest score of that choice. Pure functions.

Every method's OOF in ``pipeline.ensembling.blending`` is cross-fitted, so each score alone is honest; but
``ensemble.method: auto`` then takes the best of several on those same rows, and the best of several noisy scores
is optimistic.
``nested_choice`` scores the whole procedure the way a hidden test would: each fold is predicted by the method
chosen, and fit, on the other folds alone (their own cross-fitted OOF decides), exactly as the test is predicted by
the method chosen and fit on every OOF row. With class offsets each candidate is shifted before the choice, as in
the stage.
"""

import numpy as np

from pipeline import metrics
from pipeline.ensembling import blending
from pipeline.ensembling.voting import as_stack, check_labels

# Nesting needs two folds inside each outer fold's rest to cross-fit on.
MIN_FOLDS = 3


def with_class_offsets(result: dict, y_true, folds, metric: str) -> dict:
    """``result`` (a ``run_method`` output) shifted by per-class offsets: its OOF by offsets fit on the other folds
    (cross-fitted), its test by offsets fit on all of its OOF; the latter under "offsets"."""
    offsets = blending.fit_class_offsets(result["oof"], y_true, metric)
    oof = blending.cross_fit(lambda part, labels: blending.fit_class_offsets(part, labels, metric),
                             blending.apply_class_offsets, result["oof"], y_true, folds)
    return {**result, "oof": oof, "test": blending.apply_class_offsets(result["test"], offsets), "offsets": offsets}


def candidates(names: list[str], oof_members, y_true, folds, test_members, metric: str,
               class_offsets: bool) -> dict[str, dict]:
    """Each named method's ``run_method`` output, shifted by its own offsets when ``class_offsets``."""
    results = {name: blending.run_method(name, oof_members, y_true, folds, test_members, metric) for name in names}
    if class_offsets:
        results = {name: with_class_offsets(result, y_true, folds, metric) for name, result in results.items()}
    return results


def best_method_on_oof(results: dict[str, dict], y_true, metric: str) -> str:
    """The method whose (cross-fitted) OOF scores best; ties to the simpler one (``blending.best_of_scores``)."""
    scores = {name: metrics.score(metric, y_true, result["oof"]) for name, result in results.items()}
    return blending.best_of_scores(scores, metric)


def nested_choice(names: list[str], oof_members, y_true, folds, metric: str,
                  class_offsets: bool) -> tuple[np.ndarray, dict]:
    """Honest OOF of choosing among ``names`` on OOF -> (N x C, {fold: the method it was predicted by}).

    For each fold the candidates are run on the other folds' rows only (cross-fitted among those folds), the best is
    chosen on them, and its combination fit on those rows predicts the held fold, which nothing before saw.
    """
    stack = as_stack(oof_members, "oof_members")
    y_true = check_labels(y_true, stack.shape[1], stack.shape[2])
    folds = np.asarray(folds)
    if len(np.unique(folds)) < MIN_FOLDS:
        raise ValueError(f"a nested choice needs at least {MIN_FOLDS} folds, got {len(np.unique(folds))}")
    result, chosen = np.empty(stack.shape[1:]), {}
    for fold in np.unique(folds):
        held = folds == fold
        inner = candidates(names, stack[:, ~held], y_true[~held], folds[~held], stack[:, held], metric,
                           class_offsets)
        best = best_method_on_oof(inner, y_true[~held], metric)
        result[held], chosen[fold.item()] = inner[best]["test"], best
    return result, chosen
