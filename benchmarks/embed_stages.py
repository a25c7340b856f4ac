"""Which feature maps of the frozen backbone should the embed member read? CV of its variants on finished runs.

    python benchmarks/embed_stages.py WORK [WORK ...] [--encodings DIR] [--out benchmarks/embed_stages.json]

WORK is a finished run's work directory (``benchmarks/splits.py``'s ``seed<N>``, one per ELPV split seed): its folds,
the other members' OOF files (the fine-tuned backbones' and the features member's) and, in the first, the image cache.
Every one of the 2,624 ELPV images (the first run's training and test images: the splits differ only in which rows
are which) is read once per size by the packaged ImageNet EfficientNet-Lite0 with its mirror view, as the embed stage
reads them, and the mean- and max-pooled outputs of its final feature map (``final``) and of its blocks
(``blocks.2`` ... ``blocks.6``: forward hooks) are kept in ``--encodings`` (read again on the next call). 224 px comes
from the cache, 300 px (ELPV's own size) from the competition's files.

Per variant (a set of maps and the regression's C) and run: the member's CV (the embed stage's cross-fit logistic
regression on that run's folds, mean over folds of macro-F1), and the CV and OOF accuracy of the soft vote of the run's
other members with it in place of the embed member. Only training rows and their folds are read: no test label.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import metrics  # noqa: E402
from pipeline.data.images import load_image  # noqa: E402
from pipeline.training import embedding, linear  # noqa: E402

BLOCKS = [f"blocks.{index}" for index in range(2, 7)]
STAGES_2 = ["final", "blocks.4", "blocks.6"]  # embed.stages=2: Lite0's last two feature stages end at blocks 4 and 6
VARIANTS = [  # (label, maps at each size, C); the first is the embed default before embed.stages
    ("final map (embed.stages=0), C 0.03", {224: ["final"]}, 0.03),
    ("final map, C 0.01", {224: ["final"]}, 0.01),
    ("final + last 2 stages (embed.stages=2), C 0.003", {224: STAGES_2}, 0.003),
    ("final + last 2 stages, C 0.01", {224: STAGES_2}, 0.01),
    ("final + last 2 stages, C 0.03", {224: STAGES_2}, 0.03),
    ("final + last 2 stages, C 0.1", {224: STAGES_2}, 0.1),
    ("final + last 3 stages (embed.stages=3), C 0.03", {224: [*STAGES_2, "blocks.2"]}, 0.03),
    ("final + blocks 3-6, C 0.03", {224: ["final", *BLOCKS[1:]]}, 0.03),
    ("300 px: final map, C 0.03", {300: ["final"]}, 0.03),
    ("300 px: final + last 2 stages, C 0.03", {300: STAGES_2}, 0.03),
    ("300 px: final + blocks 3-6, C 0.03", {300: ["final", *BLOCKS[1:]]}, 0.03),
    ("224 and 300 px: final + blocks 3-6 at each, C 0.03", {224: ["final", *BLOCKS[1:]],
                                                          300: ["final", *BLOCKS[1:]]}, 0.03),
]
OTHER_MEMBERS = ("oof/tf_efficientnet_lite0.parquet", "features/oof.parquet")


def all_images(work: Path, size: int) -> tuple[list[str], np.ndarray]:
    """(ids, N x size x size x 1 uint8) of the run's training and test images: the cache's at 224 px, else decoded
    from the competition's files as prepare decodes them."""
    tables = [pd.read_parquet(work / "cache" / f"{split}.parquet") for split in ("train", "test")]
    ids = [str(i) for table in tables for i in table["id"]]
    cached = [work / "cache" / f"{split}_{size}x{size}.npy" for split in ("train", "test")]
    if all(path.exists() for path in cached):
        return ids, np.concatenate([np.load(path) for path in cached])
    files = [work / "competition" / Path(p).parent.name / Path(p).name for table in tables for p in table["path"]]
    return ids, np.stack([load_image(path, (size, size), 1) for path in files])


def encode(work: Path, size: int) -> dict[str, pd.DataFrame]:
    """{map name: pooled features of every image (rows by id)}: Lite0 frozen, each image and its mirror averaged."""
    ids, images = all_images(work, size)
    model, mean, std = embedding.frozen_backbone("efficientnet_lite0", 1)
    taps: dict[str, torch.Tensor] = {}
    for name in BLOCKS:
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: taps.__setitem__(name, o))
    scale = torch.tensor(mean).view(1, -1, 1, 1) * 255.0, torch.tensor(std).view(1, -1, 1, 1) * 255.0
    out: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for start in range(0, len(images), 32):
            batch = (torch.from_numpy(images[start:start + 32]).permute(0, 3, 1, 2).float() - scale[0]) / scale[1]
            views = []
            for view in (batch, batch.flip(3)):
                final = embedding.pooled(model.forward_features(view))
                views.append({"final": final, **{name: embedding.pooled(taps[name]) for name in BLOCKS}})
            for name in views[0]:
                out.setdefault(name, []).append(((views[0][name] + views[1][name]) / 2).numpy())
    return {name: pd.DataFrame(np.concatenate(parts), index=ids) for name, parts in out.items()}


def encodings(work: Path, size: int, folder: Path) -> dict[str, pd.DataFrame]:
    path = folder / f"lite0_{size}.npz"
    if not path.exists():
        started = time.perf_counter()
        maps = encode(work, size)
        folder.mkdir(parents=True, exist_ok=True)
        ids = np.array(next(iter(maps.values())).index, dtype=str)
        np.savez(path, ids=ids, **{name: table.to_numpy() for name, table in maps.items()})
        print(f"embed_stages: {size} px encoded in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    with np.load(path) as saved:
        return {name: pd.DataFrame(saved[name], index=saved["ids"]) for name in saved.files if name != "ids"}


def fold_mean(metric: str, labels: np.ndarray, proba: np.ndarray, folds: np.ndarray) -> float:
    return float(np.mean([metrics.score(metric, labels[folds == f], proba[folds == f]) for f in np.unique(folds)]))


def read_folds(work: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(ids, folds, class indices, class names) of a run's training rows, from its folds.csv."""
    table = pd.read_csv(work / "folds.csv", dtype={"id": str})
    classes = sorted(table["label"].unique())
    labels = table["label"].map({name: index for index, name in enumerate(classes)}).to_numpy()
    return table["id"].to_numpy(), table["fold"].to_numpy(), labels, classes


def score_run(work: Path, maps: dict, variant: tuple) -> dict:
    """The variant's member CV, and the soft vote's CV and OOF accuracy with the run's other members."""
    _, chosen, inverse_regularisation = variant
    ids, folds, labels, classes = read_folds(work)
    x = np.concatenate([maps[size][name].loc[ids].to_numpy() for size, names in chosen.items() for name in names], 1)
    oof = linear.cross_fit_logistic(x, labels, folds, x[:1], len(classes), inverse_regularisation, 0.5)[0]
    others = [pd.read_parquet(work / name).astype({"id": str}).set_index("id").loc[ids, classes].to_numpy()
              for name in OTHER_MEMBERS]
    vote = (oof + sum(others)) / (1 + len(others))
    return {"member_cv": fold_mean("macro_f1", labels, oof, folds),
            "vote_cv": fold_mean("macro_f1", labels, vote, folds),
            "vote_oof_accuracy": metrics.score("accuracy", labels, vote), "features": int(x.shape[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("works", nargs="+", type=Path, help="finished runs' work directories, one per split seed")
    parser.add_argument("--encodings", type=Path, default=ROOT / "work" / "embed_stages")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "embed_stages.json")
    args = parser.parse_args()
    maps = {size: encodings(args.works[0], size, args.encodings) for size in (224, 300)}
    rows = []
    for variant in VARIANTS:
        runs = {work.name: score_run(work, maps, variant) for work in args.works}
        means = {key: float(np.mean([run[key] for run in runs.values()])) for key in ("member_cv", "vote_cv",
                                                                                    "vote_oof_accuracy")}
        rows.append({"variant": variant[0], **means, "runs": runs})
        print(f"| {variant[0]} | {means['member_cv']:.4f} | {means['vote_cv']:.4f} | "
              f"{means['vote_oof_accuracy']:.4f} | " + " ".join(f"{run['vote_cv']:.4f}" for run in runs.values())
              + " |", flush=True)
    command = " ".join(["python", *sys.argv])
    args.out.write_text(json.dumps({"command": command, "variants": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
