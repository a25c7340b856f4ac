"""Tests for pipeline.ensembling.voting and pipeline.ensembling.blending against hand-computed tables and
constructed cases."""

import numpy as np
import pytest

from pipeline import metrics
from pipeline.ensembling import blending, voting

MEMBER_A = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
MEMBER_B = np.array([[0.7, 0.3], [0.4, 0.6], [0.1, 0.9]])


def informative_and_noise(n_rows=300, n_classes=3, seed=0):
    """Labels, a good member (true class usually highest) and a pure-noise member."""
    random = np.random.default_rng(seed)
    y_true = random.integers(0, n_classes, size=n_rows)
    logits = random.normal(size=(n_rows, n_classes))
    logits[np.arange(n_rows), y_true] += 2.0
    good = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    noise = random.dirichlet(np.ones(n_classes), size=n_rows)
    return y_true, good, noise


def assert_probability_rows(proba, n_rows, n_classes):
    assert proba.shape == (n_rows, n_classes)
    assert np.all(np.isfinite(proba))
    assert np.all(proba >= 0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)


# --- simple combiners: hand-computed tables --------------------------------------------------

@pytest.mark.parametrize(
    "weights, expected",
    [
        (None, [[0.8, 0.2], [0.3, 0.7], [0.3, 0.7]]),
        # weights 3:1 -> 0.75 / 0.25; row 0: 0.75*0.9 + 0.25*0.7 = 0.85
        ([3, 1], [[0.85, 0.15], [0.25, 0.75], [0.4, 0.6]]),
        ([0, 1], MEMBER_B),
    ],
)
def test_soft_vote(weights, expected):
    result = voting.soft_vote([MEMBER_A, MEMBER_B], weights)
    np.testing.assert_allclose(result, expected)


def test_soft_vote_accepts_a_three_dimensional_array():
    result = voting.soft_vote(np.stack([MEMBER_A, MEMBER_B]))
    np.testing.assert_allclose(result, [[0.8, 0.2], [0.3, 0.7], [0.3, 0.7]])


@pytest.mark.parametrize(
    "first, second, expected",
    [
        # sqrt(0.5*0.8) : sqrt(0.5*0.2) = sqrt(0.4) : sqrt(0.1) = 2 : 1
        ([[0.5, 0.5]], [[0.8, 0.2]], [[2 / 3, 1 / 3]]),
        # sqrt of products 0.16, 0.04, 0.04 -> 0.4, 0.2, 0.2 -> / 0.8
        ([[0.8, 0.1, 0.1]], [[0.2, 0.4, 0.4]], [[0.5, 0.25, 0.25]]),
        # exact zeros: sqrt(1 * eps) in both classes -> uniform, not NaN
        ([[1.0, 0.0]], [[0.0, 1.0]], [[0.5, 0.5]]),
    ],
)
def test_geometric_mean(first, second, expected):
    np.testing.assert_allclose(voting.geometric_mean([first, second]), expected)


def test_weighted_geometric_mean_with_a_zero_weight_returns_the_other_member():
    np.testing.assert_allclose(voting.geometric_mean([MEMBER_A, MEMBER_B], [1, 0]), MEMBER_A)


def test_rank_average():
    # A col 0 (0.9, 0.2, 0.5) -> ranks 3, 1, 2 -> /3; col 1 -> 1, 3, 2 -> /3
    # B col 0 (0.7, 0.4, 0.1) -> 3, 2, 1;          col 1 -> 1, 2, 3
    # mean col 0: 1, 1/2, 1/2; mean col 1: 1/3, 5/6, 5/6; rows sum to 4/3
    expected = [[3 / 4, 1 / 4], [3 / 8, 5 / 8], [3 / 8, 5 / 8]]
    np.testing.assert_allclose(voting.rank_average([MEMBER_A, MEMBER_B]), expected)


def test_rank_average_uses_average_ranks_for_ties():
    # col 0 (0.5, 0.5, 0.2) -> 2.5, 2.5, 1 -> 5/6, 5/6, 1/3; col 1 (0.5, 0.5, 0.8) -> 1/2, 1/2, 1
    member = [[0.5, 0.5], [0.5, 0.5], [0.2, 0.8]]
    expected = [[5 / 8, 3 / 8], [5 / 8, 3 / 8], [1 / 4, 3 / 4]]
    np.testing.assert_allclose(voting.rank_average([member]), expected)


HARD_VOTE_MEMBERS = [  # one row per case
    np.array([[0.5, 0.4, 0.1], [0.6, 0.4, 0.0], [0.4, 0.35, 0.25]]),
    np.array([[0.6, 0.3, 0.1], [0.4, 0.6, 0.0], [0.4, 0.3, 0.3]]),
    np.array([[0.1, 0.8, 0.1], [0.4, 0.6, 0.0], [0.0, 1.0, 0.0]]),
    np.array([[0.2, 0.7, 0.1], [0.6, 0.4, 0.0], [0.2, 0.2, 0.6]]),
]


@pytest.mark.parametrize(
    "weights, expected",
    [
        # row 0: votes 0,0,1,1 -> 2-2 tie; summed probability class 0 = 1.4 < class 1 = 2.2 -> class 1
        # row 1: votes 0,1,1,0 -> 2-2 tie; summed probability 2.0 = 2.0 exactly -> lowest index 0
        # row 2: votes 0,0,1,2 -> class 0 wins 2-1-1 although class 1 has more summed probability
        (None, [[0, 1, 0], [1, 0, 0], [1, 0, 0]]),
        # weight 3 on the first member: row 0 class 0 gets 4 votes vs 2
        ([3, 1, 1, 1], [[1, 0, 0], [1, 0, 0], [1, 0, 0]]),
        # weights 1,1,1,2: row 0 class 1 gets 3 vs 2; row 1 class 0 gets 3 vs 2;
        # row 2: classes 0 and 2 tie at 2 votes, weighted summed probability
        # class 0 = 0.4+0.4+0.0+2*0.2 = 1.2 < class 2 = 0.25+0.3+0.0+2*0.6 = 1.75 -> class 2
        ([1, 1, 1, 2], [[0, 1, 0], [1, 0, 0], [0, 0, 1]]),
    ],
)
def test_hard_vote(weights, expected):
    np.testing.assert_array_equal(voting.hard_vote(HARD_VOTE_MEMBERS, weights), expected)


@pytest.mark.parametrize("weights", [[1, -1], [0, 0], [1, 2, 3], [np.nan, 1]])
@pytest.mark.parametrize("combine", [voting.soft_vote, voting.geometric_mean,
                                     voting.rank_average, voting.hard_vote])
def test_bad_weights_are_rejected(combine, weights):
    with pytest.raises(ValueError, match="weights"):
        combine([MEMBER_A, MEMBER_B], weights)


def test_members_of_different_shapes_are_rejected():
    with pytest.raises(ValueError, match="shapes"):
        voting.soft_vote([MEMBER_A, MEMBER_B[:2]])


# --- learned combiners ------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["log_loss", "macro_f1", "accuracy"])
def test_fit_weights_prefers_the_good_member(metric):
    y_true, good, noise = informative_and_noise()
    weights = blending.fit_weights([noise, good], y_true, metric)
    assert weights.shape == (2,)
    assert np.all(weights >= 0)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[1] > weights[0]
    # never worse on the OOF than the uniform average
    fitted = metrics.score(metric, y_true, voting.soft_vote([noise, good], weights))
    uniform = metrics.score(metric, y_true, voting.soft_vote([noise, good]))
    assert not metrics.better(metric, uniform, fitted)


def test_fit_weights_is_deterministic():
    y_true, good, noise = informative_and_noise()
    first = blending.fit_weights([noise, good, good ** 2], y_true, "macro_f1", seed=3)
    second = blending.fit_weights([noise, good, good ** 2], y_true, "macro_f1", seed=3)
    np.testing.assert_array_equal(first, second)


def test_caruana_selection_keeps_the_good_member():
    y_true, good, noise = informative_and_noise()
    weights = blending.caruana_selection([noise, good], y_true, "log_loss", n_iterations=20)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[1] > 0.5
    # weights are counts / (init_best + n_iterations)
    np.testing.assert_allclose(weights * 21, np.round(weights * 21))


def test_caruana_selection_breaks_ties_by_lowest_index():
    y_true = np.array([0, 1])
    same = np.array([[0.9, 0.1], [0.1, 0.9]])
    weights = blending.caruana_selection([same, same], y_true, "accuracy", n_iterations=3)
    np.testing.assert_allclose(weights, [1.0, 0.0])


def test_caruana_selection_rejects_bad_init_best():
    with pytest.raises(ValueError, match="init_best"):
        blending.caruana_selection([MEMBER_A], [0, 1, 0], "accuracy", init_best=2)


def test_stacking_oof_is_honest_on_noise():
    # Noise members and random labels: nothing is learnable. The cross-fitted OOF must sit
    # near chance, while predicting the training rows themselves looks better (overfitting).
    random = np.random.default_rng(0)
    n_rows = 400
    y_true = random.integers(0, 2, size=n_rows)
    members = random.dirichlet(np.ones(2), size=(20, n_rows))
    folds = np.arange(n_rows) % 5
    oof, parameters = blending.stacking_oof(members, y_true, folds, C=100.0)
    assert parameters["n_folds"] == 5
    oof_accuracy = metrics.score("accuracy", y_true, oof)
    in_sample_accuracy = metrics.score(
        "accuracy", y_true, blending.stacking_fit_predict(members, y_true, members, C=100.0))
    assert oof_accuracy < 0.5 + 0.06
    assert in_sample_accuracy > oof_accuracy + 0.05


def test_stacking_oof_of_a_row_does_not_depend_on_its_own_label():
    random = np.random.default_rng(1)
    y_true, good, noise = informative_and_noise(n_rows=120)
    folds = random.integers(0, 4, size=120)
    oof, _ = blending.stacking_oof([good, noise], y_true, folds)
    flipped = y_true.copy()
    flipped[folds == 2] = (flipped[folds == 2] + 1) % 3
    oof_flipped, _ = blending.stacking_oof([good, noise], flipped, folds)
    np.testing.assert_allclose(oof[folds == 2], oof_flipped[folds == 2])


def test_stacking_learns_a_leaky_member():
    y_true, _, noise = informative_and_noise(n_rows=200)
    leaky = np.eye(3)[y_true]
    oof, _ = blending.stacking_oof([noise, leaky], y_true, np.arange(200) % 5)
    assert metrics.score("accuracy", y_true, oof) > 0.98


def test_stacking_keeps_all_columns_when_a_class_is_missing_from_training():
    # Class 2 only occurs in fold 0, so the model for fold 0 never sees it.
    y_true = np.array([0, 1, 2, 0, 1, 0, 1, 0, 1, 0])
    folds = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    members = [np.eye(3)[y_true] * 0.7 + 0.1]
    oof, _ = blending.stacking_oof(members, y_true, folds)
    assert_probability_rows(oof, 10, 3)
    assert np.all(oof[folds == 0, 2] < 1e-9)
    test = blending.stacking_fit_predict(members, y_true, members)
    assert_probability_rows(test, 10, 3)


def test_stacking_rejects_a_single_fold():
    with pytest.raises(ValueError, match="folds"):
        blending.stacking_oof([MEMBER_A], [0, 1, 1], [0, 0, 0])


# --- class offsets ----------------------------------------------------------------------------

def test_class_offsets_fix_an_under_predicted_class():
    random = np.random.default_rng(0)
    n_rows, n_classes = 600, 3
    y_true = random.integers(0, n_classes, size=n_rows)
    logits = random.normal(size=(n_rows, n_classes))
    logits[np.arange(n_rows), y_true] += 2.0
    logits[:, 2] -= 2.0  # class 2 systematically under-predicted
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    offsets = blending.fit_class_offsets(proba, y_true)
    before = metrics.score("macro_f1", y_true, proba)
    after = metrics.score("macro_f1", y_true, blending.apply_class_offsets(proba, offsets))
    assert after > before + 0.05
    assert offsets[2] - offsets[:2].mean() > 1.0


@pytest.mark.parametrize("seed", range(4))
def test_class_offsets_never_make_the_oof_score_worse(seed):
    random = np.random.default_rng(seed)
    y_true = random.integers(0, 4, size=80)
    proba = random.dirichlet(np.ones(4), size=80)
    offsets = blending.fit_class_offsets(proba, y_true, n_rounds=2)
    before = metrics.score("macro_f1", y_true, proba)
    after = metrics.score("macro_f1", y_true, blending.apply_class_offsets(proba, offsets))
    assert after >= before


def test_class_offsets_stay_zero_when_nothing_improves():
    y_true = np.array([0, 1, 2, 1])
    offsets = blending.fit_class_offsets(np.eye(3)[y_true] * 0.8 + 0.2 / 3, y_true)
    np.testing.assert_array_equal(offsets, np.zeros(3))


def test_apply_class_offsets_by_hand():
    # log([0.5, 0.5]) + [ln 3, 0] -> softmax proportional to 1.5 : 0.5
    result = blending.apply_class_offsets([[0.5, 0.5]], [np.log(3.0), 0.0])
    np.testing.assert_allclose(result, [[0.75, 0.25]])


# --- run_method / best_of_scores -----------------------------------------------------------------

@pytest.mark.parametrize("method", list(blending.METHODS))
def test_every_method_returns_clean_rows_even_with_exact_zeros(method):
    y_true, good, noise = informative_and_noise(n_rows=60)
    one_hot = np.eye(3)[(y_true + 1) % 3]  # confidently wrong, full of exact zeros
    zero_column = good.copy()
    zero_column[:, 2] = 0.0
    zero_column /= zero_column.sum(axis=1, keepdims=True)
    oof_members = [good, noise, one_hot, zero_column]
    test_members = [member[:25] for member in oof_members]
    result = blending.run_method(method, oof_members, y_true, np.arange(60) % 3,
                                   test_members, "macro_f1")
    assert_probability_rows(result["oof"], 60, 3)
    assert_probability_rows(result["test"], 25, 3)
    if method in ("weighted", "caruana"):
        assert len(result["weights"]) == 4
        assert sum(result["weights"]) == pytest.approx(1.0)
    else:
        assert result["weights"] is None


def test_cross_fit_by_hand():
    # fit: the class shares of the other folds' labels; apply: that share on every held row.
    oof = np.full((4, 2), 0.5)
    y_true = np.array([0, 0, 1, 1])
    folds = np.array([0, 0, 1, 1])

    def fit(part, labels):
        return np.bincount(labels, minlength=2) / len(labels)

    def apply(part, shares):
        return np.tile(shares, (len(part), 1))

    # Fold 0's rows only see fold 1's labels (all 1) and the other way round.
    expected = [[0, 1], [0, 1], [1, 0], [1, 0]]
    np.testing.assert_array_equal(blending.cross_fit(fit, apply, oof, y_true, folds), expected)
    with pytest.raises(ValueError, match="2 folds"):
        blending.cross_fit(fit, apply, oof, y_true, np.zeros(4, dtype=int))


@pytest.mark.parametrize("method", ["weighted", "caruana"])
def test_learnt_weights_are_cross_fitted_on_oof_and_fit_on_all_rows_for_test(method):
    y_true, good, noise = informative_and_noise(n_rows=60)
    stack = np.stack([good, noise, 0.5 * (good + noise)])
    folds = np.arange(60) % 3
    result = blending.run_method(method, stack, y_true, folds, stack[:, :20], "macro_f1")
    fit = blending.fit_weights if method == "weighted" else blending.caruana_selection
    for fold in range(3):
        held = folds == fold
        weights = fit(stack[:, ~held], y_true[~held], "macro_f1")
        np.testing.assert_allclose(result["oof"][held], voting.soft_vote(stack[:, held], weights))
    all_rows = fit(stack, y_true, "macro_f1")
    np.testing.assert_allclose(result["weights"], all_rows)
    np.testing.assert_allclose(result["test"], voting.soft_vote(stack[:, :20], all_rows))


def test_run_method_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"soft.*stacking"):
        blending.run_method("blend", [MEMBER_A], [0, 1, 1], [0, 1, 2], [MEMBER_A], "accuracy")
    with pytest.raises(ValueError, match="macro_f1"):
        blending.run_method("soft", [MEMBER_A], [0, 1, 1], [0, 1, 2], [MEMBER_A], "f2")


@pytest.mark.parametrize(
    "scores, metric, expected",
    [
        ({"soft": 0.8, "stacking": 0.9, "rank": 0.85}, "macro_f1", "stacking"),
        ({"soft": 0.4, "stacking": 0.3, "rank": 0.5}, "log_loss", "stacking"),
        ({"stacking": 0.9, "soft": 0.9}, "accuracy", "soft"),  # tie: first in METHODS order
        ({"caruana": 0.7, "weighted": 0.7, "hard": 0.6}, "accuracy", "weighted"),
        ({"soft": float("nan"), "hard": 0.5}, "accuracy", "hard"),
    ],
)
def test_select_best(scores, metric, expected):
    assert blending.best_of_scores(scores, metric) == expected


def test_select_best_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"soft.*stacking"):
        blending.best_of_scores({"blend": 0.5}, "accuracy")
    with pytest.raises(ValueError, match="macro_f1"):
        blending.best_of_scores({"soft": 0.5}, "f2")
