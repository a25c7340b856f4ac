"""Stage eda: look at the data before training on it.

Reads:  ``paths.cache``/ train.npy, test.npy, train.parquet, test.parquet, meta.json (from
        prepare), and the headers (not the pixels) of the original image files the
        parquet tables point at.
Writes: ``paths.eda``/ report.md (the readable report, PNGs embedded by relative links),
        eda.json (every number in it), and in figures/ (what ``dvc plots show`` shows):
        class_balance.png, sizes.png, intensity.png, samples.png, adversarial.png, plus
        groups.png with a group column, labels_<column>.png per head or aux column,
        duplicates.png when duplicates are found.

What a competitor checks first: how unbalanced the classes are (and per group, per extra
label column), whether train and test images come in the same sizes, the mean/std that
training normalises with (recomputed from the cache; it must equal prepare's), what each
class looks like, and duplicates: identical or near-identical images inside train (label
noise, an inflated CV score) and between train and test (leakage). The cache is read in
one streaming pass, so memory does not grow with the competition; the folder is swapped
in whole, so a killed run leaves the previous report.
"""

from __future__ import annotations

import sys

import numpy as np
from matplotlib.figure import Figure

from pipeline import cli, layout
from pipeline.analysis.adversarial import THUMBNAIL, adversarial_validation, thumbnail_features
from pipeline.analysis.report import (
    fmt,
    markdown_report,
    pick_samples,
    plot_adversarial,
    plot_class_balance,
    plot_crosstab,
    plot_duplicates,
    plot_groups,
    plot_intensity,
    plot_samples,
    plot_sizes,
)
from pipeline.analysis.statistics import (
    EXAMPLES,
    NEAR_THRESHOLD,
    add_pixel_differences,
    channel_stats,
    class_balance,
    class_intensity,
    compare_sizes,
    duplicate_summary,
    find_duplicates,
    group_summary,
    group_table,
    label_crosstab,
    read_sizes,
    scan_images,
    size_summary,
)
from pipeline.artifacts import atomic_dir, save_figure, write_json, write_text
from pipeline.config import Config
from pipeline.data.images import Cache
from pipeline.layout import slug

# ---------------------------------------------------------------- the stage

def train_versus_test(train, train_images, test_images, listed: int = EXAMPLES) -> tuple[dict, dict]:
    """Adversarial validation on thumbnails: (its summary for eda.json and the report, raw scores for the figure)."""
    result = adversarial_validation(thumbnail_features(train_images), thumbnail_features(test_images))
    likeness = result["test_likeness"]
    order = np.argsort(-likeness, kind="stable")[:listed]
    summary = {"auc": result["auc"], "fold_aucs": result["fold_aucs"], "verdict": result["verdict"],
               "advice": result["advice"], "thumbnail": THUMBNAIL,
               "most_test_like": [{"row": int(i), "id": str(train["id"].iloc[i]), "label": str(train["target"].iloc[i]),
                                   "test_likeness": float(likeness[i])} for i in order]}
    return summary, {"test_likeness": likeness, "test_probability": result["test_probability"]}


def analyse(cache: Cache, threshold: int = NEAR_THRESHOLD) -> tuple[dict, dict, dict]:
    """Every number of the report: (summary for eda.json, tables, raw material for the figures)."""
    train, test = cache.table("train"), cache.table("test")
    train_images, test_images = cache.images("train"), cache.images("test")
    class_names = cache.class_names
    balance = class_balance(train["target"], class_names)
    groups = group_table(train) if "group" in train.columns else None
    label_columns = [c for c in [*cache.meta.get("heads", {}), *cache.meta.get("aux", {})] if c in train.columns]
    tables = {"balance": balance, **{f"labels_{c}": label_crosstab(train, c, class_names) for c in label_columns}}
    train_sizes, test_sizes = read_sizes(train["path"], "eda train sizes"), read_sizes(test["path"], "eda test sizes")
    train_scan, test_scan = scan_images(train_images, "eda train pixels"), scan_images(test_images, "eda test pixels")
    mean, std = channel_stats(train_scan["histogram"])
    test_mean, test_std = channel_stats(test_scan["histogram"])
    tables["intensity"] = class_intensity(train_scan["sums"], train["target"], class_names,
                                          int(np.prod(train_images.shape[1:3])))
    duplicates = find_duplicates(train.assign(digest=train_scan["digests"], hash=train_scan["hashes"]),
                                 test.assign(digest=test_scan["digests"], hash=test_scan["hashes"]), threshold)
    add_pixel_differences(duplicates, train_images, test_images)
    counts = balance["count"]
    summary = {
        "n_train": len(train), "n_test": len(test), "class_names": class_names,
        "class_counts": counts.to_dict(), "class_shares": balance["share"].to_dict(),
        "imbalance_ratio": float(counts.max() / max(counts.min(), 1)),
        "n_groups": len(groups) if groups is not None else None,
        "groups": group_summary(groups) if groups is not None else None,
        "label_columns": {c: tables[f"labels_{c}"].to_dict(orient="index") for c in label_columns},
        "cache_size_hw": list(train_images.shape[1:3]), "channels": int(train_images.shape[3]),
        "sizes": {"train": size_summary(train_sizes), "test": size_summary(test_sizes),
                  "comparison": compare_sizes(train_sizes, test_sizes)},
        "intensity": {"mean": mean, "std": std, "test_mean": test_mean, "test_std": test_std,
                      "class_mean": tables["intensity"]["mean"].to_dict()},
        "duplicates": duplicate_summary(duplicates, threshold),
    }
    summary["adversarial"], adversarial_raw = train_versus_test(train, train_images, test_images)
    raw = {"train": train, "train_images": train_images, "test_images": test_images, "groups": groups,
           "sizes": (train_sizes, test_sizes), "histograms": (train_scan["histogram"], test_scan["histogram"]),
           "duplicates": duplicates, **adversarial_raw}
    return summary, tables, raw


def figures(summary: dict, tables: dict, raw: dict) -> dict[str, Figure]:
    """File name -> figure, for every plot the data calls for."""
    samples = pick_samples(raw["train"]["target"], summary["class_names"])
    plots = {"class_balance.png": plot_class_balance(tables["balance"]),
             "sizes.png": plot_sizes(*raw["sizes"]),
             "intensity.png": plot_intensity(*raw["histograms"], tables["intensity"]),
             "samples.png": plot_samples(raw["train_images"], samples, tables["balance"]["count"])}
    if raw["groups"] is not None:
        plots["groups.png"] = plot_groups(raw["groups"])
    for column in summary["label_columns"]:
        plots[f"labels_{slug(column)}.png"] = plot_crosstab(tables[f"labels_{column}"])
    plots["adversarial.png"] = plot_adversarial(raw["test_likeness"], raw["test_probability"], raw["train_images"],
                                                summary["adversarial"]["most_test_like"])
    duplicates = plot_duplicates(raw["train_images"], raw["test_images"], raw["duplicates"])
    if duplicates is not None:
        plots["duplicates.png"] = duplicates
    return plots


def main(cfg: Config) -> dict:
    summary, tables, raw = analyse(Cache.open(cfg))
    plots = figures(summary, tables, raw)
    summary["plots"] = [f"{layout.EDA_FIGURES}/{name}" for name in sorted(plots)]  # relative to the report
    # The folder is swapped in whole: no plot of an earlier run outlives it, a killed run changes nothing.
    with atomic_dir(layout.eda_dir(cfg)) as folder:
        for name, figure in plots.items():
            save_figure(folder / layout.EDA_FIGURES / name, figure)
        write_json(folder / layout.EDA_SUMMARY, summary)
        write_text(folder / layout.EDA_REPORT, markdown_report(summary, tables, sorted(plots)))
    duplicates = summary["duplicates"]
    print(f"eda: {summary['n_train']} train / {summary['n_test']} test images, classes {summary['class_counts']}; "
          f"mean {fmt(summary['intensity']['mean'])} std {fmt(summary['intensity']['std'])}; "
          f"duplicates: {duplicates['exact_train']['sets']} exact sets "
          f"({duplicates['exact_train']['label_conflicts']} with conflicting labels), "
          f"{duplicates['near_train']['pairs']} near pairs in train, {duplicates['exact_leak']['test_images']} exact "
          f"and {duplicates['near_leak']['pairs']} near train-test pairs; train vs test ROC AUC "
          f"{summary['adversarial']['auc']:.3f} ({summary['adversarial']['verdict']}); "
          f"report in {layout.eda_dir(cfg) / layout.EDA_REPORT}",
          file=sys.stderr)
    return summary


if __name__ == "__main__":
    cli.run(main, "Explore the cached competition: classes, sizes, intensities, samples, duplicates.")
