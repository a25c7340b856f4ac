"""EDA's figures and its Markdown report, drawn from the numbers of ``pipeline.analysis.statistics``."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.analysis.statistics import SAMPLES_PER_CLASS
from pipeline.layout import EDA_FIGURES, slug


def new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas, outside pyplot's global state (no display needed, safe in tests)."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_class_balance(balance: pd.DataFrame) -> Figure:
    figure = new_figure(max(4.0, 0.5 * len(balance) + 2), 3.2)
    axes = figure.subplots()
    bars = axes.bar(balance.index.astype(str), balance["count"], color="tab:blue")
    axes.bar_label(bars, labels=[f"{c}\n{s:.1%}" for c, s in zip(balance["count"], balance["share"])], fontsize=8)
    axes.set(title="Training images per class", xlabel="class", ylabel="images")
    axes.margins(y=0.2)
    return figure


def plot_groups(groups: pd.DataFrame) -> Figure:
    figure = new_figure(9, 3.2)
    left, right = figure.subplots(1, 2)
    low, high = groups["images"].min(), groups["images"].max()
    # One bar per image count while that stays readable, 30 bins beyond.
    bins = np.arange(low, high + 2) - 0.5 if high - low < 30 else 30
    left.hist(groups["images"], bins=bins, color="tab:blue")
    left.set(title=f"Images per group ({len(groups)} groups)", xlabel="images", ylabel="groups")
    by_classes = groups["classes"].value_counts().sort_index()
    right.bar(by_classes.index.astype(str), by_classes.values, color="tab:orange")
    right.set(title="Distinct classes per group", xlabel="classes", ylabel="groups")
    return figure


def plot_crosstab(table: pd.DataFrame) -> Figure:
    figure = new_figure(max(4.0, 0.5 * len(table) + 3), 3.2)
    axes = figure.subplots()
    bottom = np.zeros(len(table))
    for value in table.columns:
        axes.bar(table.index.astype(str), table[value], bottom=bottom, label=str(value))
        bottom += table[value].to_numpy()
    axes.set(title=f"Class x {table.columns.name}", xlabel="class", ylabel="images")
    axes.legend(title=table.columns.name, fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    return figure


def plot_sizes(train: pd.DataFrame, test: pd.DataFrame) -> Figure:
    figure = new_figure(11, 3.2)
    for axes, column in zip(figure.subplots(1, 3), ("width", "height", "aspect")):
        values = pd.concat([train[column], test[column]]).dropna()
        # A single value would give hist() a zero-width range; widen it so the bar shows.
        low, high = (values.min(), values.max()) if len(values) else (0, 1)
        edges = np.linspace(low - 0.5 if low == high else low, high + 0.5 if low == high else high, 31)
        for frame, name in ((train, "train"), (test, "test")):
            values = frame[column].dropna()
            axes.hist(values, bins=edges, alpha=0.6, label=name, weights=np.full(len(values), 1 / max(len(values), 1)))
        axes.set(title=f"Original {column}", xlabel=column if column != "aspect" else "width / height",
                 ylabel="share of images")
        axes.legend(fontsize=8)
    return figure


def plot_intensity(train_histogram: np.ndarray, test_histogram: np.ndarray, classes: pd.DataFrame) -> Figure:
    figure = new_figure(11, 3.4)
    left, right = figure.subplots(1, 2)
    colours = {1: ["tab:blue"], 3: ["tab:red", "tab:green", "tab:blue"]}.get(len(train_histogram))
    for histogram, name, style in ((train_histogram, "train", "-"), (test_histogram, "test", "--")):
        for channel, counts in enumerate(histogram):
            label = name if len(histogram) == 1 else f"{name} c{channel}"
            left.plot(np.arange(256), counts / max(counts.sum(), 1), style, label=label,
                      color=colours[channel] if colours else None)
    left.set(title="Pixel intensities (cache)", xlabel="value", ylabel="share of pixels")
    left.legend(fontsize=8)
    right.bar(classes.index.astype(str), classes["mean"], yerr=classes["image_mean_std"], capsize=3,
              color="tab:green")
    right.set(title="Mean intensity per class (error bar: std over images)", xlabel="class", ylabel="mean in [0, 1]")
    return figure


def pick_samples(targets, class_names: list[str], per_class: int = SAMPLES_PER_CLASS, seed: int = 0) -> dict:
    """Up to ``per_class`` row indices per class, drawn without replacement, seeded, in row order."""
    targets = np.asarray(targets).astype(str)
    rng = np.random.default_rng(seed)
    chosen = {}
    for name in class_names:
        rows = np.flatnonzero(targets == name)
        chosen[name] = np.sort(rng.choice(rows, size=min(per_class, len(rows)), replace=False))
    return chosen


def show(axes, image: np.ndarray, title: str) -> None:
    """A uint8 H x W x C image on ``axes``, grey on a fixed 0-255 scale, without ticks."""
    if image.shape[-1] == 1:
        axes.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        axes.imshow(image, interpolation="nearest")
    axes.set_title(title, fontsize=8)
    axes.axis("off")


def sample_mosaic(images, samples: dict, gap: int = 2) -> np.ndarray:
    """One uint8 H x W x C canvas: a row per class of ``samples``, its images left to right, white gaps."""
    height, width, channels = images.shape[1:]
    columns = max([len(rows) for rows in samples.values()] + [1])
    canvas = np.full((len(samples) * (height + gap), columns * (width + gap), channels), 255, dtype=np.uint8)
    for row, rows in enumerate(samples.values()):
        for column, index in enumerate(rows):
            top, left = row * (height + gap), column * (width + gap)
            canvas[top:top + height, left:left + width] = images[index]
    return canvas


def plot_samples(images, samples: dict, counts: pd.Series) -> Figure:
    """One row per class, up to ``len`` of its samples from left to right, drawn as one image (fast at any count)."""
    columns = max([len(rows) for rows in samples.values()] + [1])
    figure = new_figure(1.2 * columns + 1.2, 1.2 * len(samples) + 0.6)
    axes = figure.subplots()
    mosaic = sample_mosaic(images, samples)
    if mosaic.shape[-1] == 1:
        axes.imshow(mosaic[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        axes.imshow(mosaic, interpolation="nearest")
    row_height = mosaic.shape[0] / max(len(samples), 1)
    axes.set_yticks((np.arange(len(samples)) + 0.5) * row_height - 1,
                    [f"{name}\n({counts.get(name, 0)})" for name in samples])
    axes.set_xticks([])
    axes.tick_params(length=0)
    for side in axes.spines.values():
        side.set_visible(False)
    axes.set_title("Samples per class (cache resolution; class and image count at left)")
    return figure


def plot_duplicates(train_images, test_images, duplicates: dict, limit: int = 3) -> Figure | None:
    """The first ``limit`` pairs of each kind of duplicate, each pair side by side; None when there are none."""
    panels = []
    for kind in ("exact_train", "near_train", "exact_leak", "near_leak"):
        other = test_images if "leak" in kind else train_images
        for row in duplicates[kind].head(limit).itertuples():
            a, b = np.asarray(train_images[row.row_a]), np.asarray(other[row.row_b])
            gap = np.full((a.shape[0], max(2, a.shape[1] // 16), a.shape[2]), 255, dtype=np.uint8)
            difference = f", px {row.pixel_difference:.3f}" if hasattr(row, "pixel_difference") else ""
            panels.append((np.concatenate([a, gap, b], axis=1),
                           f"{kind}: d={row.distance}{difference}\n{row.id_a} | {row.id_b}"))
    if not panels:
        return None
    columns = min(len(panels), 4)
    figure = new_figure(2.8 * columns, 1.9 * -(-len(panels) // columns))
    grid = figure.subplots(-(-len(panels) // columns), columns, squeeze=False)
    for axes in grid.ravel():
        axes.axis("off")
    for axes, (image, title) in zip(grid.ravel(), panels):
        show(axes, image, title)
    figure.suptitle("Duplicate pairs (train left; d: dHash bits apart, px: mean pixel difference)", fontsize=9)
    return figure


def plot_adversarial(test_likeness: np.ndarray, test_probability: np.ndarray, train_images, most_test_like: list,
                     limit: int = 8) -> Figure:
    """Left: how test-like the classifier finds train and test images; right: the most test-like training images."""
    figure = new_figure(2.0 * min(limit, 4) + 4.5, 3.6)
    left, right = figure.subfigures(1, 2, width_ratios=[4.5, 2.0 * min(limit, 4)])
    axes = left.subplots()
    bins = np.linspace(0, 1, 31)
    axes.hist(test_likeness, bins=bins, alpha=0.6, density=True, label="train")
    axes.hist(test_probability, bins=bins, alpha=0.6, density=True, label="test")
    axes.set(title="Out-of-fold P(test) of each image", xlabel="P(test)", ylabel="density")
    axes.legend(fontsize=8)
    shown = most_test_like[:limit]
    grid = right.subplots(max(1, -(-len(shown) // 4)), min(max(len(shown), 1), 4), squeeze=False)
    for panel in grid.ravel():
        panel.axis("off")
    for panel, row in zip(grid.ravel(), shown):
        title = f"{row['id']} ({row['label']})\nP(test) {row['test_likeness']:.2f}"
        show(panel, np.asarray(train_images[row["row"]]), title)
    right.suptitle("Most test-like training images", fontsize=9)
    return figure


def adversarial_lines(adversarial: dict) -> list[str]:
    """The report's adversarial-validation section: the AUC, the verdict in plain words, the most test-like rows."""
    folds = ", ".join(f"{auc:.3f}" for auc in adversarial["fold_aucs"])
    lines = [f"A logistic regression on {adversarial['thumbnail']}x{adversarial['thumbnail']} thumbnails and "
             f"per-image brightness/contrast tells train from test with ROC AUC **{adversarial['auc']:.3f}** "
             f"(folds {folds}; 0.5 = indistinguishable). **{adversarial['verdict']}**: {adversarial['advice']}. "
             f"It sees pixel-level shifts only.", "", "| training id | label | P(test) |", "|---|---|---|"]
    lines += [f"| {row['id']} | {row['label']} | {row['test_likeness']:.3f} |" for row in adversarial["most_test_like"]]
    return lines + [""]


# ---------------------------------------------------------------- the report

def markdown_report(summary: dict, tables: dict[str, pd.DataFrame], plots: list[str]) -> str:
    """The readable report: one section per topic with its tables, the PNGs (``plots``, in the figures folder
    beside it) linked relatively."""
    def image(name: str, caption: str) -> list[str]:
        return [f"![{caption}]({EDA_FIGURES}/{name})", ""] if name in plots else []

    height, width = summary["cache_size_hw"]
    headline = (f"{summary['n_train']} training images in {len(summary['class_names'])} classes, "
                f"{summary['n_test']} test images; cache {height}x{width} x {summary['channels']} channel(s).")
    lines = ["# Exploratory data analysis", "", headline, "",
             "## Class balance", "", tables["balance"].round(4).to_markdown(), "",
             f"Largest / smallest class: {summary['imbalance_ratio']:.2f}.", "", *image("class_balance.png", "classes")]
    if summary["groups"]:
        groups, per_group = summary["groups"], summary["groups"]["images_per_group"]
        text = (f"{groups['n_groups']} groups; images per group min {per_group['min']}, median "
                f"{per_group['median']:g}, max {per_group['max']}. Groups by number of distinct classes: "
                f"{groups['groups_by_class_count']}.")
        lines += ["## Groups", "", text, "", *image("groups.png", "groups")]
    for column in summary["label_columns"]:
        lines += [f"## Class x {column}", "", tables[f"labels_{column}"].to_markdown(), "",
                  *image(f"labels_{slug(column)}.png", column)]
    lines += ["## Original image sizes", "", "Read from the files' headers.", "",
              *size_lines(summary["sizes"]), *image("sizes.png", "sizes")]
    intensity = summary["intensity"]
    text = (f"Train per-channel mean {fmt(intensity['mean'])}, std {fmt(intensity['std'])} (in [0, 1], what "
            f"training normalises with; equal to the cache's meta.json); test mean {fmt(intensity['test_mean'])}, "
            f"std {fmt(intensity['test_std'])}.")
    lines += ["## Intensity", "", text, "", tables["intensity"].round(4).to_markdown(), "",
              *image("intensity.png", "intensity"), "## Samples", "", *image("samples.png", "samples"),
              "## Duplicates", "", *duplicate_lines(summary["duplicates"]), *image("duplicates.png", "duplicate pairs"),
              "## Train vs test (adversarial validation)", "", *adversarial_lines(summary["adversarial"]),
              *image("adversarial.png", "adversarial validation")]
    return "\n".join(lines)


def size_lines(sizes: dict) -> list[str]:
    lines = []
    for split in ("train", "test"):
        info = sizes[split]
        if "most_common" not in info:
            lines += [f"**{split}**: no readable original files ({info['unreadable']} unreadable).", ""]
            continue
        unreadable = f"; {info['unreadable']} unreadable file(s)" if info["unreadable"] else ""
        width, height, aspect = info["width"], info["height"], info["aspect"]
        text = (f"**{split}**: {info['distinct_sizes']} distinct size(s), width {width['min']:g}-{width['max']:g}, "
                f"height {height['min']:g}-{height['max']:g}, aspect {aspect['min']:.2f}-{aspect['max']:.2f}"
                f"{unreadable}.")
        lines += [text, "", pd.DataFrame(info["most_common"]).round(4).to_markdown(index=False), ""]
    ks = sizes["comparison"]["ks"]
    if ks:
        verdict = "**differ**: check resizing/cropping choices" if sizes["comparison"]["differ"] else "match"
        distances = ", ".join(f"{column} {value:.3f}" for column, value in ks.items())
        lines += [f"Train and test size distributions {verdict} (KS distance {distances}).", ""]
    return lines


def duplicate_lines(duplicates: dict) -> list[str]:
    exact, near = duplicates["exact_train"], duplicates["near_train"]
    exact_leak, near_leak = duplicates["exact_leak"], duplicates["near_leak"]
    leaking = near_leak["test_images"]
    lines = [f"Exact: identical cached pixels. Near: dHash distance <= {duplicates['threshold']} of 64 bits, "
             "between images that are not identical. Pixel difference: mean absolute difference of the cached "
             "images in [0, 1], near 0 for a true copy." + scale_note(duplicates["random_pairs"]), "",
             "| kind | count |", "|---|---|",
             f"| exact duplicate sets in train | {exact['sets']} ({exact['redundant_images']} redundant images) |",
             f"| ... of which with conflicting labels | {exact['label_conflicts']} |",
             f"| near-duplicate pairs in train | {near['pairs']} ({near['label_disagreements']} with other labels) |",
             f"| test images identical to a train image (leak) | {exact_leak['test_images']} |",
             f"| near train-test pairs (possible leak) | {near_leak['pairs']} ({leaking} test images) |",
             ""]
    for title, examples in (("Exact duplicate sets in train", exact["examples"]),
                            ("Near duplicates in train", near["examples"]),
                            ("Test images identical to train images", exact_leak["examples"]),
                            ("Near train-test pairs", near_leak["examples"])):
        if examples:
            table = pd.DataFrame(examples).astype(str).to_markdown(index=False)
            lines += [f"**{title}** (first {len(examples)})", "", table, ""]
    return lines


def scale_note(random_pairs: dict) -> str:
    if not random_pairs.get("sampled_pairs"):
        return ""
    quantiles = random_pairs["quantiles"]
    return (f" For scale, random train pairs are a median {quantiles[0.5]:g} bits apart and 1 in 1000 is within "
            f"{quantiles[0.001]:g} bits: where that is near the threshold the images share one layout and near pairs "
            "are often merely alike, so look at them (duplicates.png) before treating them as copies.")


def fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


