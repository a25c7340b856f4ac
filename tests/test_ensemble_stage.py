"""The ensemble stage end to end on a hand-built work dir: a cache index, folds and two members' tables."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import make_config_backbones_only as make_config

from pipeline import ensemble, metrics, submit
from pipeline.artifacts import probability_table
from pipeline.ensembling import blending, selection
from pipeline.errors import ConfigError, DataError

CLASSES = ["cat", "dog", "owl"]
N_TRAIN, N_TEST = 120, 12


def member_proba(labels: np.ndarray, signal: float, rng: np.random.Generator) -> np.ndarray:
    """Softmax of noise plus `signal` on the true class: a strong signal is a good model, a weak one noise."""
    logits = rng.normal(size=(len(labels), len(CLASSES)))
    logits[np.arange(len(labels)), labels] += signal
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def build_work(cfg, tta_oof_for=("good",), seed: int = 0) -> dict:
    """The files ensemble reads, as prepare/folds/train/infer would write them; member rows shuffled."""
    rng = np.random.default_rng(seed)
    cache = cfg.path("cache")
    cache.mkdir(parents=True)
    (cache / "meta.json").write_text(json.dumps({
        "size_hw": list(cfg.data.size_hw), "channels": cfg.data.channels, "class_names": CLASSES,
        "id_col": "image_id", "target_col": "animal", "mean": [0.5], "std": [0.2]}))
    # Ids with leading zeros: they must survive every CSV round trip as text.
    test_ids = [f"{i:04d}" for i in range(500, 500 + N_TEST)]
    pd.DataFrame({"image_id": test_ids, "animal": "cat"}).to_csv(cache / "sample_submission.csv", index=False)
    test_labels = np.arange(N_TEST) % len(CLASSES)
    pd.DataFrame({"image_id": test_ids, "animal": [CLASSES[i] for i in test_labels],
                  "Usage": ["Public", "Private"] * (N_TEST // 2)}).to_csv(cache / "solution.csv", index=False)
    train_ids = np.array([f"{i:04d}" for i in range(N_TRAIN)])
    labels = rng.integers(0, len(CLASSES), N_TRAIN)
    folds = np.arange(N_TRAIN) % cfg.folds.n_splits
    pd.DataFrame({"id": train_ids, "label": [CLASSES[i] for i in labels], "group": train_ids,
                  "fold": folds}).to_csv(cfg.path("folds"), index=False)
    for name in cfg.backbones:
        signal = 3.0 if name == "good" else 0.3
        order = rng.permutation(N_TRAIN)
        oof = probability_table(train_ids[order], member_proba(labels[order], signal, rng), CLASSES, folds[order])
        test = probability_table(test_ids, member_proba(test_labels, signal, rng), CLASSES)
        cfg.path("oof").mkdir(exist_ok=True)
        cfg.path("preds").mkdir(exist_ok=True)
        oof.to_parquet(cfg.path("oof") / f"{name}.parquet", index=False)
        test.to_parquet(cfg.path("preds") / f"{name}.parquet", index=False)
        if name in tta_oof_for:
            oof.to_parquet(cfg.path("preds") / f"{name}_oof.parquet", index=False)
    return {"labels": labels, "train_ids": train_ids, "test_ids": test_ids}


def member_oof(cfg, ids) -> dict[str, np.ndarray]:
    """The OOF the ensemble reads for `good` (infer's TTA'd file) and `noisy` (train's), rows in ``ids`` order."""
    return {name: pd.read_parquet(path).set_index("id").loc[ids, CLASSES].to_numpy()
            for name, path in (("good", cfg.path("preds") / "good_oof.parquet"),
                               ("noisy", cfg.path("oof") / "noisy.parquet"))}


@pytest.fixture
def work(tmp_path):
    cfg = make_config(tmp_path / "work", "backbones=[good,noisy]", "ensemble.method=auto",
                      "ensemble.class_offsets=false")
    return cfg, build_work(cfg)


def test_ensemble_writes_every_output_and_beats_the_best_single(work):
    cfg, truth = work
    scores = ensemble.main(cfg)
    out = cfg.path("ensemble")
    for name in ("oof.parquet", "test.parquet", "weights.json", "report.md", "report.csv",
                 "correlation.png"):
        assert (out / name).exists(), name

    oof, test = pd.read_parquet(out / "oof.parquet"), pd.read_parquet(out / "test.parquet")
    assert list(oof.columns) == ["id", "fold", *CLASSES] and list(test.columns) == ["id", *CLASSES]
    assert oof["id"].tolist() == truth["train_ids"].tolist()  # folds.csv order, not a member's shuffled order
    assert test["id"].tolist() == truth["test_ids"]  # sample-submission order, ids as text
    np.testing.assert_allclose(oof[CLASSES].sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(test[CLASSES].sum(axis=1), 1.0, atol=1e-9)

    assert scores["best_single"] == "good"
    assert scores["oof_score"] >= scores["best_single_score"]
    assert scores["oof_score"] == pytest.approx(metrics.score(cfg.metric, truth["labels"],
                                                              oof[CLASSES].to_numpy()))
    written = json.loads((cfg.path("metrics") / "ensemble.json").read_text())
    assert written == pytest.approx({k: v for k, v in scores.items() if k not in ("method", "metric", "best_single")})

    report = pd.read_csv(out / "report.csv", keep_default_na=False)
    assert set(report.loc[report["kind"] == "method", "name"]) == set(cfg.ensemble.methods)
    assert set(report.loc[report["kind"] == "model", "name"]) == {"good", "noisy"}
    chosen = report.loc[report["selected"] == "chosen", "name"].tolist()
    assert chosen == [scores["method"]] == [blending.best_of_scores(
        dict(zip(report["name"][report["kind"] == "method"], report[cfg.metric][report["kind"] == "method"])),
        cfg.metric)]
    markdown = (out / "report.md").read_text()
    assert all(f"| {name} |" in markdown for name in [*cfg.ensemble.methods, "good", "noisy"])
    assert "![OOF probability correlation](correlation.png)" in markdown
    # Two folds leave one to choose on inside each: no nesting, and the report says the CV keeps the choice's optimism.
    assert scores["ensemble_cv"] == scores["oof_score"] and "is not nested (2 folds" in markdown

    weights = json.loads((out / "weights.json").read_text())
    assert weights["members"] == ["good", "noisy"] and weights["method"] == scores["method"]
    assert "good_oof.parquet (infer (TTA))" in weights["oof_sources"]["good"]  # infer's OOF preferred
    assert weights["oof_sources"]["noisy"] == "oof/noisy.parquet (train (no TTA))"  # relative to the work dir


def test_weighted_method_leans_on_the_good_member_and_offsets_are_reported(tmp_path):
    cfg = make_config(tmp_path / "work", "backbones=[good,noisy]", "ensemble.method=weighted",
                      "ensemble.methods=[soft]", "ensemble.class_offsets=true")
    build_work(cfg)
    scores = ensemble.main(cfg)
    weights = json.loads((cfg.path("ensemble") / "weights.json").read_text())
    assert weights["selection"] == "fixed" and weights["base_method"] == "weighted"
    assert weights["nested_choices"] == {} and scores["ensemble_cv"] == scores["oof_score"]  # nothing chosen
    assert weights["weights"]["good"] > weights["weights"]["noisy"]
    assert set(weights["class_offsets"]) == set(CLASSES)
    assert scores["method"] == "weighted+offsets"
    # The submitted OOF is cross-fitted: each fold shifted by offsets fit on the other folds' rows.
    before = pd.read_parquet(cfg.path("ensemble") / "oof.parquet").set_index("id")
    folds = pd.read_csv(cfg.path("folds"), dtype={"id": str}).set_index("id").loc[before.index]
    labels = np.array([CLASSES.index(label) for label in folds["label"]])
    members = {name: pd.read_parquet(path).set_index("id").loc[before.index, CLASSES].to_numpy()
               for name, path in (("good", cfg.path("preds") / "good_oof.parquet"),
                                  ("noisy", cfg.path("oof") / "noisy.parquet"))}
    blended = np.zeros((len(before), len(CLASSES)))
    for fold in np.unique(folds["fold"]):
        held = (folds["fold"] == fold).to_numpy()
        weights = blending.fit_weights([m[~held] for m in members.values()], labels[~held], cfg.metric)
        blended[held] = weights[0] * members["good"][held] + weights[1] * members["noisy"][held]
    expected = np.zeros_like(blended)
    for fold in np.unique(folds["fold"]):
        held = (folds["fold"] == fold).to_numpy()
        offsets = blending.fit_class_offsets(blended[~held], labels[~held], cfg.metric)
        expected[held] = blending.apply_class_offsets(blended[held], offsets)
    np.testing.assert_allclose(before[CLASSES].to_numpy(), expected, atol=1e-9)
    assert scores["oof_score"] == pytest.approx(metrics.score(cfg.metric, labels, expected))
    assert "cross-fitted" in (cfg.path("ensemble") / "report.md").read_text()


def test_with_offsets_auto_chooses_among_the_shifted_methods(tmp_path):
    """Every method is shifted by its own cross-fitted offsets, and auto takes the best of those shifted scores."""
    cfg = make_config(tmp_path / "work", "backbones=[good,noisy]", "ensemble.methods=[soft,hard,weighted]",
                      "ensemble.method=auto", "ensemble.class_offsets=true")
    truth = build_work(cfg, seed=2)  # a draw where the best method before offsets is not the best after them
    scores = ensemble.main(cfg)
    report = pd.read_csv(cfg.path("ensemble") / "report.csv", keep_default_na=False)
    shifted, unshifted = report[report["kind"] == "offsets"], report[report["kind"] == "method"]
    assert sorted(shifted["name"]) == ["hard+offsets", "soft+offsets", "weighted+offsets"]
    members = member_oof(cfg, truth["train_ids"])
    folds = np.arange(N_TRAIN) % cfg.folds.n_splits
    soft = (members["good"] + members["noisy"]) / 2
    soft_shifted = blending.cross_fit(lambda p, y: blending.fit_class_offsets(p, y, cfg.metric),
                                      blending.apply_class_offsets, soft, truth["labels"], folds)
    assert shifted.set_index("name").loc["soft+offsets", cfg.metric] == pytest.approx(
        metrics.score(cfg.metric, truth["labels"], soft_shifted))
    best = shifted.loc[shifted[cfg.metric].idxmax(), "name"]  # macro-F1: higher is better
    assert best != unshifted.loc[unshifted[cfg.metric].idxmax(), "name"] + "+offsets"
    assert scores["method"] == best == report.loc[report["selected"] == "chosen", "name"].item()


def test_auto_reports_the_nested_cv_of_its_choice_and_submit_shows_it(tmp_path):
    """With three folds and more, the CV of ``auto`` is nested: each fold predicted by the method chosen and fit on
    the other folds alone. It is what the leaderboard's cv column holds."""
    cfg = make_config(tmp_path / "work", "backbones=[weak,noisy]", "folds.n_splits=3", "ensemble.method=auto",
                      "ensemble.class_offsets=true")
    truth = build_work(cfg, seed=3)  # two weak members: the methods differ, and so do the folds' choices
    scores = ensemble.main(cfg)
    members = np.stack([pd.read_parquet(cfg.path("oof") / f"{name}.parquet").set_index("id").loc[
        truth["train_ids"], CLASSES].to_numpy() for name in ("weak", "noisy")])
    oof, chosen = selection.nested_choice(list(cfg.ensemble.methods), members, truth["labels"],
                                          np.arange(N_TRAIN) % 3, cfg.metric, class_offsets=True)
    assert scores["ensemble_cv"] == pytest.approx(metrics.score(cfg.metric, truth["labels"], oof))
    assert scores["ensemble_cv"] != pytest.approx(scores["oof_score"])
    # The gain over the best member is the honest CV's, not the chosen method's optimistic OOF score's.
    assert scores["gain_over_best_single"] == pytest.approx(scores["ensemble_cv"] - scores["best_single_score"])
    weights = json.loads((cfg.path("ensemble") / "weights.json").read_text())
    assert weights["nested_choices"] == {str(fold): f"{name}+offsets" for fold, name in chosen.items()}
    assert json.loads((cfg.path("metrics") / "ensemble.json").read_text())["ensemble_cv"] == scores["ensemble_cv"]
    assert f"**CV {cfg.metric} {scores['ensemble_cv']:.4f}**" in (cfg.path("ensemble") / "report.md").read_text()
    assert submit.main(cfg)["cv"] == scores["ensemble_cv"]


def test_the_default_submits_the_plain_mean_of_the_members(tmp_path):
    """By default nothing is fit: the submission is the members' mean and the CV that mean's OOF score, whichever
    method would have scored best on OOF (here weighted and stacking do: `good` is far stronger than `noisy`)."""
    cfg = make_config(tmp_path / "work", "backbones=[good,noisy]")
    truth = build_work(cfg)
    scores = ensemble.main(cfg)
    oof_mean = np.mean(list(member_oof(cfg, truth["train_ids"]).values()), axis=0)
    test_mean = np.mean([pd.read_parquet(cfg.path("preds") / f"{name}.parquet")[CLASSES] for name in cfg.backbones],
                        axis=0)
    np.testing.assert_allclose(pd.read_parquet(cfg.path("ensemble") / "test.parquet")[CLASSES], test_mean)
    assert scores["method"] == "soft"
    assert scores["ensemble_cv"] == pytest.approx(metrics.score(cfg.metric, truth["labels"], oof_mean))
    assert scores["ensemble_cv"] < scores["best_single_score"]  # the fixed rule is kept even where it loses


def test_single_backbone_ensemble_is_that_model_aligned_by_id(tmp_path):
    cfg = make_config(tmp_path / "work", "backbones=[good]", "ensemble.class_offsets=false")
    truth = build_work(cfg, tta_oof_for=())
    scores = ensemble.main(cfg)
    member = pd.read_parquet(cfg.path("oof") / "good.parquet").set_index("id")
    oof = pd.read_parquet(cfg.path("ensemble") / "oof.parquet").set_index("id")
    assert oof.index.tolist() == truth["train_ids"].tolist()
    np.testing.assert_allclose(oof.loc[member.index, CLASSES], member[CLASSES])
    np.testing.assert_allclose(pd.read_parquet(cfg.path("ensemble") / "test.parquet")[CLASSES],
                               pd.read_parquet(cfg.path("preds") / "good.parquet")[CLASSES])
    assert scores["method"] == "single" and scores["gain_over_best_single"] == pytest.approx(0.0)
    assert (cfg.path("ensemble") / "correlation.png").exists()


def _rename_class(frame):
    return frame.rename(columns={"owl": "bird"})


def _drop_first_row(frame):
    return frame.iloc[1:]


def _unknown_id(frame):
    frame = frame.copy()
    frame.loc[frame.index[0], "id"] = "9999"
    return frame


def _nan(frame):
    frame = frame.copy()
    frame.loc[frame.index[0], "dog"] = np.nan
    return frame


def _unnormalised(frame):
    frame = frame.copy()
    frame.loc[frame.index[0], CLASSES] = [0.5, 0.5, 0.5]
    return frame


def _wrong_fold(frame):
    frame = frame.copy()
    frame.loc[frame.index[0], "fold"] = 1 - frame.loc[frame.index[0], "fold"]
    return frame


@pytest.mark.parametrize("file, damage, expected", [
    ("oof/noisy.parquet", _rename_class, ["oof/noisy.parquet", "preds/good_oof.parquet", "class columns"]),
    ("preds/noisy.parquet", _rename_class, ["preds/noisy.parquet", "preds/good.parquet", "class columns"]),
    ("oof/noisy.parquet", _drop_first_row, ["oof/noisy.parquet", "preds/good_oof.parquet", "different ids"]),
    ("preds/noisy.parquet", _drop_first_row, ["preds/noisy.parquet", "preds/good.parquet", "different ids"]),
    ("preds/good.parquet", _drop_first_row, ["preds/good.parquet", "sample_submission.csv", "different ids"]),
    ("preds/good_oof.parquet", _unknown_id, ["preds/good_oof.parquet", "folds.csv", "9999"]),
    ("oof/noisy.parquet", _nan, ["oof/noisy.parquet", "NaN"]),
    ("preds/noisy.parquet", _unnormalised, ["preds/noisy.parquet", "do not sum to 1", "0500"]),
    ("oof/noisy.parquet", _wrong_fold, ["oof/noisy.parquet", "folds.csv", "other folds"]),
])
def test_inconsistent_members_raise_data_error_naming_the_files(work, file, damage, expected):
    cfg, _ = work
    path = cfg.path("work_dir") / file
    damage(pd.read_parquet(path)).to_parquet(path, index=False)
    with pytest.raises(DataError) as error:
        ensemble.main(cfg)
    for text in expected:
        assert text in str(error.value)


def test_a_third_member_is_compared_with_the_first(tmp_path):
    cfg = make_config(tmp_path / "work", "backbones=[good,noisy,other]")
    build_work(cfg)
    path = cfg.path("oof") / "other.parquet"
    pd.read_parquet(path).iloc[1:].to_parquet(path, index=False)
    with pytest.raises(DataError, match=r"oof/other.parquet and \S+/preds/good_oof.parquet hold different ids"):
        ensemble.main(cfg)


def test_unknown_method_names_the_valid_ones(work):
    cfg, _ = work
    cfg.ensemble.methods = ["soft", "bogus"]
    with pytest.raises(ConfigError, match="bogus.*valid methods: soft, weighted, hard"):
        ensemble.main(cfg)
    cfg.ensemble.methods, cfg.ensemble.method = ["soft"], "median"
    with pytest.raises(ConfigError, match="ensemble.method 'median' is unknown; valid: auto, soft"):
        ensemble.main(cfg)
