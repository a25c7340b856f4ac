"""Stage ensemble: combine the backbones' out-of-fold and test probabilities.

Reads:  ``paths.cache``/meta.json (classes) and sample_submission.csv (test order), ``paths.folds``
        (labels, folds), and per backbone ``paths.preds``/<backbone>.parquet (test probabilities)
        with its OOF from ``paths.preds``/<backbone>_oof.parquet (infer's TTA'd OOF, which is
        what matches the test predictions) or, when infer wrote none, ``paths.oof``/<backbone>.parquet.
Writes: ``paths.ensemble``/ oof.parquet (id, fold, classes), test.parquet (id, classes, in the
        sample submission's order), weights.json (chosen method, its weights, the members and
        their OOF files), report.md and report.csv (every model's and method's OOF score),
        correlation.png (the members' OOF correlation); ``paths.metrics``/ensemble.json (the chosen
        method and its OOF score: DVC metrics, at the top level for git and ``dvc exp show``).

Every method of ``ensemble.methods`` runs on the same members, aligned by id, and is scored on
OOF with ``metric``, accuracy and log loss next to every single model. ``ensemble.method:
auto`` takes the best OOF score; test labels are never read here. Every learnt combination (weights,
Caruana, stacking, class offsets) is cross-fitted over the folds on OOF, so each OOF score is an honest
estimate and ``auto`` compares like with like. With one backbone the ensemble is that model.
``ensemble.class_offsets`` shifts per-class log-probabilities of every method before ``auto`` chooses. The math lives
in ``pipeline.ensembling.voting`` and ``pipeline.ensembling.blending``; this module only reads, checks, writes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import cli, layout, metrics
from pipeline.artifacts import (
    probability_table,
    read_text_csv,
    save_figure,
    write_csv,
    write_json,
    write_parquet,
    write_text,
)
from pipeline.config import Config
from pipeline.data.competition import encode_labels
from pipeline.data.images import Cache
from pipeline.data.stage_tables import check_same_ids, describe_ids, read_folds, read_probabilities
from pipeline.ensembling import blending, selection
from pipeline.errors import ConfigError, DataError

SINGLE = "single"


# ---------------------------------------------------------------- reading and checking

def oof_path(cfg: Config, backbone: str) -> tuple[Path, str]:
    """infer's TTA'd OOF when it exists (it matches the test predictions), else train's OOF."""
    tta = layout.preds_oof_file(cfg, backbone)
    if tta.exists():
        return tta, "infer (TTA)"
    return layout.oof_file(cfg, backbone), "train (no TTA)"


def member_files(cfg: Config) -> dict[str, tuple[Path, str, Path]]:
    """Each member's (OOF file, the stage that wrote it, test file): every backbone, then the features stage's
    member when ``features.enabled`` and the embed stage's when ``embed.enabled``."""
    files = {backbone: (*oof_path(cfg, backbone), layout.preds_file(cfg, backbone)) for backbone in cfg.backbones}
    if cfg.features.enabled:
        folder = layout.features_dir(cfg)
        files[layout.FEATURES_MEMBER] = (folder / layout.FEATURES_OOF, "features", folder / layout.FEATURES_TEST)
    if cfg.embed.enabled:
        folder = layout.embed_dir(cfg)
        files[layout.EMBED_MEMBER] = (folder / layout.EMBED_OOF, "embed", folder / layout.EMBED_TEST)
    return files


@dataclass
class Members:
    """Every backbone's OOF and test probabilities, aligned row for row by id."""

    names: list[str]
    sources: dict[str, str]  # backbone -> the OOF file used and where it came from
    ids: np.ndarray  # OOF ids, in folds.csv order
    folds: np.ndarray
    y_true: np.ndarray
    oof: np.ndarray  # M x N x C
    test_ids: np.ndarray  # in the sample submission's order
    test: np.ndarray  # M x Nt x C


def load_members(cfg: Config, cache: Cache) -> Members:
    """Read, check and align every backbone's OOF and test tables; every problem names its files."""
    class_names = list(cache.class_names)
    folds = read_folds(cfg)
    sample_path = cache.folder / layout.CACHE_SAMPLE_SUBMISSION
    sample = read_text_csv(sample_path, "sample submission", "prepare")
    id_col = cache.meta["id_col"]
    if id_col not in sample.columns:
        raise DataError(f"{sample_path} has no id column {id_col!r}: re-run prepare")
    sample_ids = sample[id_col].tolist()
    oof_frames, test_frames, sources = [], [], {}
    reference_oof = reference_test = cache.folder / layout.CACHE_META
    files = member_files(cfg)
    for backbone, (path, origin, test_path) in files.items():
        oof = read_probabilities(path, f"OOF of {backbone}", class_names, reference_oof, with_fold=True)
        maker = origin if origin in ("features", "embed") else "infer"
        test = read_probabilities(test_path, f"test predictions of {backbone} (run {maker})", class_names,
                                  reference_test, with_fold=False)
        if oof_frames:
            fix = "re-run train and infer for every backbone on the same folds"
            check_same_ids(oof["id"], oof_frames[0]["id"], path, reference_oof, fix)
            check_same_ids(test["id"], test_frames[0]["id"], test_path, reference_test, fix)
        else:
            check_same_ids(test["id"], sample_ids, test_path, sample_path,
                           "re-run infer (it predates the current image cache)")
        unknown = sorted(set(oof["id"]) - set(folds["id"]))
        if unknown:
            raise DataError(f"{path} holds {describe_ids(unknown)} that are not in {layout.folds_file(cfg)}: "
                            f"re-run train/infer after the folds stage")
        fold_of = dict(zip(folds["id"], folds["fold"]))
        moved = oof["id"][oof["fold"].astype(int).to_numpy() != oof["id"].map(fold_of).to_numpy()]
        if len(moved):
            raise DataError(f"{path} puts {describe_ids(moved)} in other folds than {layout.folds_file(cfg)}: "
                            f"it is stale, re-run train/infer")
        if not oof_frames:  # every later member is compared with the first one
            reference_oof, reference_test = path, test_path
        oof_frames.append(oof)
        test_frames.append(test)
        # Relative to the work dir, so weights.json reads the same on every machine.
        sources[backbone] = f"{path.relative_to(layout.work_dir(cfg))} ({origin})"
    rows = folds[folds["id"].isin(set(oof_frames[0]["id"]))]
    if len(rows) < len(folds):
        print(f"ensemble: the OOF covers {len(rows)} of the {len(folds)} training images in {layout.folds_file(cfg)}",
              file=sys.stderr)
    ids = rows["id"].to_numpy()
    return Members(
        names=list(files), sources=sources, ids=ids, folds=rows["fold"].to_numpy(),
        y_true=encode_labels(rows["label"], class_names, str(layout.folds_file(cfg))),
        oof=np.stack([f.set_index("id").loc[ids, class_names].to_numpy(float) for f in oof_frames]),
        test_ids=np.asarray(sample_ids),
        test=np.stack([f.set_index("id").loc[sample_ids, class_names].to_numpy(float) for f in test_frames]))


# ---------------------------------------------------------------- choosing

def check_methods(cfg: Config) -> list[str]:
    """The methods to run (``ensemble.methods`` plus a fixed ``ensemble.method``); names checked first."""
    valid = ", ".join(blending.METHODS)
    unknown = [m for m in cfg.ensemble.methods if m not in blending.METHODS]
    if unknown:
        raise ConfigError(f"ensemble.methods {unknown} are unknown; valid methods: {valid}")
    if cfg.ensemble.method != "auto" and cfg.ensemble.method not in blending.METHODS:
        raise ConfigError(f"ensemble.method {cfg.ensemble.method!r} is unknown; valid: auto, {valid}")
    if cfg.metric not in metrics.METRICS:
        raise ConfigError(f"metric {cfg.metric!r} is unknown; valid: {', '.join(metrics.METRICS)}")
    fixed = [] if cfg.ensemble.method == "auto" else [cfg.ensemble.method]
    names = list(dict.fromkeys([*cfg.ensemble.methods, *fixed]))
    if not names:
        raise ConfigError("ensemble.methods is empty and ensemble.method is auto: list at least one method")
    return names


def score_row(metric: str, y_true, proba) -> dict:
    """The competition metric, accuracy and log loss of one OOF prediction."""
    return {metric: metrics.score(metric, y_true, proba), "accuracy": metrics.accuracy(y_true, proba),
            "log_loss": metrics.log_loss(y_true, proba)}


def run_methods(names: list[str], members: Members, metric: str) -> dict[str, dict]:
    """Each method's {"oof", "test", "weights"} (the candidates ``selection.nested_choice`` scores too, before
    offsets); with one member only the model itself."""
    if len(members.names) == 1:
        return {SINGLE: {"oof": members.oof[0], "test": members.test[0], "weights": [1.0]}}
    return selection.candidates(names, members.oof, members.y_true, members.folds, members.test, metric,
                                class_offsets=False)


def choose(cfg: Config, choices: dict, y_true) -> str:
    """The submitted method: the only model, the configured one, or under auto the best (shifted) OOF score, by the
    same rule the nested CV applies inside each fold (``selection.best_method_on_oof``)."""
    if SINGLE in choices:
        return SINGLE
    if cfg.ensemble.method != "auto":
        return cfg.ensemble.method
    return selection.best_method_on_oof({name: {"oof": c.oof} for name, c in choices.items()}, y_true, cfg.metric)


def format_weights(names: list[str], weights) -> str:
    return "" if weights is None else " ".join(f"{n}={w:.3f}" for n, w in zip(names, weights))


# ---------------------------------------------------------------- reporting

def correlation_figure(members: Members):
    """Annotated heatmap of the Pearson correlation of the members' flattened OOF probabilities.

    The colours run from the least correlated pair to 1 (members of one ensemble are all fairly alike, so a
    0..1 scale would paint every pair one colour); the diagonal, 1 by definition, is greyed out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(members.names)
    correlation = np.corrcoef(members.oof.reshape(count, -1)).reshape(count, -1)
    diagonal = np.eye(count, dtype=bool)
    pairs = correlation[~diagonal & np.isfinite(correlation)]
    lowest = min(float(pairs.min()), 0.99) if pairs.size else 0.0
    size = max(3.5, 0.9 * count + 2)
    figure, axis = plt.subplots(figsize=(size, size * 0.85))
    colours = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = axis.imshow(np.ma.masked_array(correlation, diagonal), cmap=colours, vmin=lowest, vmax=1.0)
    axis.set_xticks(range(count), members.names, rotation=45, ha="right")
    axis.set_yticks(range(count), members.names)
    for (row, column), value in np.ndenumerate(correlation):
        dark = not diagonal[row, column] and image.norm(value) < 0.6
        axis.text(column, row, f"{value:.3f}", ha="center", va="center", color="white" if dark else "black")
    figure.colorbar(image, ax=axis, fraction=0.046, label="Pearson r")
    axis.set_title("OOF probability correlation")
    return figure


def markdown_table(table: pd.DataFrame) -> str:
    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def report_markdown(table: pd.DataFrame, scores: dict, members: Members, cfg: Config, notes: str) -> str:
    how = ("the only model" if len(members.names) == 1 else
           f"auto: best OOF {scores['metric']} of the methods" if cfg.ensemble.method == "auto" else "fixed by config")
    sources = "\n".join(f"- {name}: {source}" for name, source in members.sources.items())
    notes = f"\n{notes}\n" if notes else ""
    return f"""# Ensemble report

Metric **{scores['metric']}** on {len(members.ids)} out-of-fold rows. Chosen: **{scores['method']}** ({how}; \
test labels are never used). **CV {scores['metric']} {scores['ensemble_cv']:.4f}**; the chosen method's OOF \
{scores['oof_score']:.4f}; best single model {scores['best_single']} {scores['best_single_score']:.4f}; the CV's \
gain over it {scores['gain_over_best_single']:+.4f} (positive is better).

{markdown_table(table)}

Every OOF score here is cross-fitted, so each is honest on its own: `weighted`, `caruana` and `stacking` blend
each fold by weights or a stacker fit on the other folds (the test uses weights fit on all OOF rows). The best of
them is not: picking it on these rows is the optimism the nested CV removes. `rank` is a score, not probabilities,
and `hard` is one-hot: ignore their log loss.
{notes}
OOF files used:

{sources}

## Member correlation

![OOF probability correlation](correlation.png)
"""


# ---------------------------------------------------------------- the stage

@dataclass
class Choice:
    """The submitted ensemble: the chosen method's output, after class offsets when enabled."""

    method: str  # the chosen method, "+offsets" appended when offsets were applied
    base_method: str
    oof: np.ndarray
    test: np.ndarray
    weights: list | None
    offsets: np.ndarray | None
    score_before_offsets: float
    offsets_note: str = ""
    cv: float = float("nan")  # the honest estimate of the test score: nested when auto chose (see nested_cv)
    nested_choices: dict | None = None  # fold -> the method auto chose without it
    cv_note: str = ""


def score_table(members: Members, results: dict, metric: str) -> pd.DataFrame:
    """One row per single model and per method: OOF metric, accuracy, log loss, weights."""
    rows = [{"name": n, "kind": "model", **score_row(metric, members.y_true, p), "weights": "", "selected": ""}
            for n, p in zip(members.names, members.oof)]
    rows += [{"name": n, "kind": "method", **score_row(metric, members.y_true, r["oof"]),
              "weights": format_weights(members.names, r["weights"]), "selected": ""} for n, r in results.items()]
    return pd.DataFrame(rows)


def apply_offsets(cfg: Config, members: Members, chosen: str, result: dict, class_names: list[str]) -> Choice:
    """The chosen method's output, with per-class offsets when ``ensemble.class_offsets``: the test's fit on
    all OOF rows, the OOF's cross-fitted (each fold shifted by offsets fit on the other folds)."""
    metric, y_true = cfg.metric, members.y_true
    before = metrics.score(metric, y_true, result["oof"])
    choice = Choice(chosen, chosen, result["oof"], result["test"], result["weights"], None, before)
    if not cfg.ensemble.class_offsets:
        return choice
    shifted = selection.with_class_offsets(result, y_true, members.folds, metric)
    choice.method, choice.offsets, choice.oof, choice.test = (f"{chosen}+offsets", shifted["offsets"], shifted["oof"],
                                                              shifted["test"])
    choice.offsets_note = (
        f"Class offsets {dict(zip(class_names, np.round(choice.offsets, 3).tolist()))}: OOF {metric} {before:.4f} "
        f"before, {metrics.score(metric, y_true, choice.oof):.4f} after, cross-fitted (each fold shifted by "
        f"offsets fit on the other folds), so the after-score is honest and may be lower.")
    return choice


def nested_cv(cfg: Config, members: Members, method_names: list[str], choice: Choice) -> tuple[float, dict, str]:
    """The honest CV of the submitted ensemble -> (score, {fold: method}, a note for the report).

    A fixed method or a single model involves no choice, so its cross-fitted OOF score is the CV. ``auto`` is scored
    nested (``selection.nested_choice``): each fold predicted by the method chosen and fit on the other folds."""
    own = metrics.score(cfg.metric, members.y_true, choice.oof)
    if len(members.names) == 1 or cfg.ensemble.method != "auto":
        return own, {}, ""
    n_folds = len(np.unique(members.folds))
    if n_folds < selection.MIN_FOLDS:
        return own, {}, (f"The choice among methods is not nested ({n_folds} folds; nesting needs "
                         f"{selection.MIN_FOLDS}): CV is the chosen method's OOF score, optimistic by the choice.")
    oof, chosen = selection.nested_choice(method_names, members.oof, members.y_true, members.folds, cfg.metric,
                                          cfg.ensemble.class_offsets)
    score = metrics.score(cfg.metric, members.y_true, oof)
    suffix = "+offsets" if cfg.ensemble.class_offsets else ""
    by_fold = ", ".join(f"fold {fold}: {name}{suffix}" for fold, name in chosen.items())
    return score, {str(fold): f"{name}{suffix}" for fold, name in chosen.items()}, (
        f"CV {cfg.metric} {score:.4f} is nested: each fold predicted by the method chosen and fit on the other folds "
        f"alone ({by_fold}), as the test is by the method chosen on all of them. The chosen method's own OOF score "
        f"{own:.4f} is optimistic by {own - score:+.4f}: it is the best of {len(method_names)} on the rows it is "
        f"scored on.")


def summarise(table: pd.DataFrame, choice: Choice, members: Members, metric: str) -> dict:
    """The flat scores.json: the honest CV against the best single model's OOF score (gain > 0 is better), and the
    chosen method's own OOF score."""
    singles = table[table["kind"] == "model"].to_dict("records")
    best = singles[0]
    for row in singles[1:]:
        if metrics.better(metric, row[metric], best[metric]):
            best = row
    oof_score = metrics.score(metric, members.y_true, choice.oof)
    sign = 1.0 if metrics.greater_is_better(metric) else -1.0
    scores = {"method": choice.method, "metric": metric, "ensemble_cv": choice.cv, "oof_score": oof_score,
              "best_single": best["name"],
              "best_single_score": float(best[metric]),
              "gain_over_best_single": float(sign * (choice.cv - best[metric]))}
    if choice.offsets is not None:
        scores["oof_score_before_offsets"] = choice.score_before_offsets
    return scores


def write_outputs(cfg: Config, members: Members, choice: Choice, table: pd.DataFrame, scores: dict,
                  class_names: list[str]) -> None:
    out = layout.ensemble_dir(cfg)
    write_parquet(out / layout.ENSEMBLE_OOF, probability_table(members.ids, choice.oof, class_names, members.folds))
    write_parquet(out / layout.ENSEMBLE_TEST, probability_table(members.test_ids, choice.test, class_names))
    write_json(out / layout.ENSEMBLE_WEIGHTS, {
        "method": choice.method, "base_method": choice.base_method, "best_single": scores["best_single"],
        "selection": "auto" if cfg.ensemble.method == "auto" else "fixed", "metric": cfg.metric,
        "members": members.names,
        "weights": None if choice.weights is None else dict(zip(members.names, choice.weights)),
        "class_offsets": None if choice.offsets is None else dict(zip(class_names, choice.offsets.tolist())),
        "nested_choices": choice.nested_choices, "oof_sources": members.sources})
    write_json(layout.ensemble_scores_file(cfg), metrics.numbers_only(scores))
    write_csv(out / layout.ENSEMBLE_TABLE, table)
    save_figure(out / layout.ENSEMBLE_CORRELATION, correlation_figure(members))
    write_text(out / layout.ENSEMBLE_REPORT, report_markdown(table, scores, members, cfg,
                                                                  "\n\n".join(filter(None, [choice.offsets_note,
                                                                                             choice.cv_note]))))


def main(cfg: Config) -> dict:
    method_names = check_methods(cfg)
    cache = Cache.open(cfg)
    class_names = list(cache.class_names)
    members = load_members(cfg, cache)
    results = run_methods(method_names, members, cfg.metric)
    table = score_table(members, results, cfg.metric)
    # With class offsets every method is shifted (cross-fitted) before the choice: a method that offsets cannot move
    # (hard voting) must not win on its score before them.
    choices = {name: apply_offsets(cfg, members, name, result, class_names) for name, result in results.items()}
    if cfg.ensemble.class_offsets:
        rows = [{"name": c.method, "kind": "offsets", **score_row(cfg.metric, members.y_true, c.oof), "weights": "",
                 "selected": ""} for c in choices.values()]
        table = pd.concat([table, pd.DataFrame(rows)], ignore_index=True)
    choice = choices[choose(cfg, choices, members.y_true)]
    table.loc[table["name"] == choice.method, "selected"] = "chosen"
    choice.cv, choice.nested_choices, choice.cv_note = nested_cv(cfg, members, method_names, choice)
    scores = summarise(table, choice, members, cfg.metric)
    write_outputs(cfg, members, choice, table, scores, class_names)

    sources = "\n  ".join(f"{n}: {s}" for n, s in members.sources.items())
    with pd.option_context("display.width", 200, "display.float_format", "{:.4f}".format):
        print(f"ensemble: OOF files\n  {sources}\n{table.to_string(index=False)}", file=sys.stderr)
    print(f"ensemble: chosen {choice.method}, CV {scores['metric']} {scores['ensemble_cv']:.4f} (its OOF "
          f"{scores['oof_score']:.4f}; best single {scores['best_single']} {scores['best_single_score']:.4f}, "
          f"CV's gain {scores['gain_over_best_single']:+.4f})"
          + "".join(f"\n{note}" for note in (choice.offsets_note, choice.cv_note) if note), file=sys.stderr)
    return scores


if __name__ == "__main__":
    cli.run(main, "Combine the backbones' OOF and test probabilities; choose the method on OOF.")
