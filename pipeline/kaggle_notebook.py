"""The code-competition kernel: the trained folds, TTA and the ensemble on the hidden test images, offline.

``python -m pipeline.kaggle_package`` copies this file as the kernel's ``code_file``. On Kaggle it runs with the
internet off, beside the competition's files and the package's dataset; anywhere else the folders are arguments:

    python kaggle_notebook.py --dataset DATASET_FOLDER --competition COMPETITION_FOLDER --output OUT_FOLDER

It needs torch, timm, pandas and numpy (and Pillow, which timm brings): the project itself (``pipeline``) and ttach
are vendored in the dataset's ``code/`` folder and imported from there, and only the modules that need nothing more
are imported (no config, no scikit-learn, no scipy, no albumentations). Each backbone's folds predict the test
images with the TTA views infer used, averaged and merged as infer merges them (a full-data refit blended in as
infer blends it); the embed member's frozen backbones read the images at its own size and its saved per-fold
regressions predict from their pooled features, and the features member's saved k-means filters and regressions
from their encoding, the folds averaged, as their stages did; the members are combined by the method, weights and
class offsets the ensemble stage chose (any method but stacking, which ``kaggle_package`` refuses);
``submission.csv`` has the sample submission's shape, as the submit stage writes it, and ensemble_probabilities.csv
the combined probabilities (the ensemble stage's test.parquet, for a check).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MANIFEST = "pipeline-package.json"  # in the dataset folder: what the packager recorded; how the kernel finds it
PROBABILITIES = "ensemble_probabilities.csv"  # beside submission.csv


def find_dataset(root: Path) -> Path:
    """The folder under ``root`` (Kaggle's /kaggle/input) that holds the package's manifest."""
    for depth in ("*", "*/*", "*/*/*", "*/*/*/*"):
        found = sorted(root.glob(f"{depth}/{MANIFEST}"))
        if found:
            return found[0].parent
    raise SystemExit(f"error: no {MANIFEST} under {root}: attach the package's dataset to this notebook, or pass "
                     f"--dataset FOLDER")


def find_competition(dataset: Path, root: Path) -> Path:
    """/kaggle/input/<competition>, or wherever under ``root`` the competition's sample submission lies."""
    manifest = json.loads((dataset / MANIFEST).read_text())
    folder = root / manifest["competition"]
    if (folder / manifest["sample_submission"]).exists():
        return folder
    for depth in ("*", "*/*", "*/*/*"):
        found = sorted(root.glob(f"{depth}/{manifest['sample_submission']}"))
        if found:
            return found[0].parent
    raise SystemExit(f"error: no {manifest['sample_submission']} under {root}: attach the competition's data, or "
                     f"pass --competition FOLDER")


def test_paths(ids: list[str], folder: Path) -> list[Path]:
    """``<folder>/<id>`` or ``<folder>/<id>.<ext>`` for every id, as prepare finds them; every missing id named."""
    from pipeline.data.images import index_images

    index = index_images(folder)
    missing = [i for i in ids if i not in index]
    if missing:
        raise SystemExit(f"error: {len(missing)} test id(s) have no image in {folder}: {missing[:10]}")
    return [index[i] for i in ids]


def combine(ensemble: dict, members: list[str], class_names: list[str], stack):
    """The members' test probabilities (M x N x C) combined as the ensemble stage chose (``weights.json``)."""
    import numpy as np

    from pipeline.ensembling import blending, voting

    base = ensemble["base_method"]
    weights = ensemble.get("weights")
    weights = None if weights is None else [weights[name] for name in members]
    if base == "single":
        proba = stack[0]
    elif base in ("soft", "weighted", "caruana"):
        proba = voting.soft_vote(stack, weights if base != "soft" else None)
    else:
        proba = {"hard": voting.hard_vote, "geometric": voting.geometric_mean, "rank": voting.rank_average}[base](stack)
    offsets = ensemble.get("class_offsets")
    if offsets:
        proba = blending.apply_class_offsets(proba, np.array([offsets[name] for name in class_names], dtype=float))
    return proba


def member_proba(dataset: Path, member: dict, manifest: dict, images, device):
    """One backbone's test probabilities: every fold's TTA views averaged, merged, the refit blended in (as infer)."""
    import numpy as np

    from pipeline.training.checkpoints import load_fold_model
    from pipeline.training.loop import autocast_dtype
    from pipeline.training.tta import merge_views, predict_views
    from pipeline.training.views import tta_transforms

    compose = tta_transforms(manifest["tta"], tuple(manifest["size_hw"]))
    amp = autocast_dtype(manifest["amp"], device)
    channels_last = manifest["channels_last"] and device.type == "cuda"
    indices = np.arange(len(images))

    def views(path):
        model, _ = load_fold_model(dataset / path, manifest["class_names"], device)
        return predict_views(model, images, indices, compose, device, manifest["batch_size"], amp, channels_last)

    proba = merge_views(sum(views(path) for path in member["folds"]) / len(member["folds"]), manifest["merge"])
    if member.get("refit"):
        weight = member["refit_weight"]
        proba = (1 - weight) * proba + weight * merge_views(views(member["refit"]), manifest["merge"])
    return proba


def embed_proba(dataset: Path, member: dict, manifest: dict, paths: list[Path], device):
    """The embed member's test probabilities: each frozen backbone (its weights from the dataset) reads the images at
    the embed stage's size, and its pooled features (the mean of its views') go through the saved regressions, the
    folds averaged (as the embed stage predicted its test images)."""
    import numpy as np

    from pipeline.data.images import load_image
    from pipeline.training import embedding

    meta, regressions = embedding.load_regressions(dataset / member["regressions"])
    size = (meta["image_size"], meta["image_size"])
    images = np.stack([load_image(p, size, meta["channels"]) for p in paths])
    features = []
    for backbone, weights_file in zip(meta["backbones"], member["weights"], strict=True):
        model, _, _ = embedding.backbone_model(backbone["timm_model"], dataset / weights_file, meta["channels"])
        features.append(embedding.embed_images(model, images, backbone["mean"], backbone["std"], meta["tta"],
                                               member["batch_size"], f"embed {backbone['name']}", device,
                                               meta["stages"]))
    return embedding.folds_proba(regressions, np.concatenate(features, 1), len(manifest["class_names"]))


def features_proba(dataset: Path, member: dict, manifest: dict, images):
    """The features member's test probabilities: each fold's saved k-means filters encode the images (decoded at the
    networks' size, as the stage read the cache) and its regression reads them, the folds averaged."""
    from pipeline.training import embedding

    meta, regressions = embedding.load_regressions(dataset / member["regressions"])
    return embedding.features_member_proba(regressions, meta["settings"], images, len(manifest["class_names"]))


def one_member(dataset: Path, member: dict, manifest: dict, images, paths: list[Path], device):
    """One member's test probabilities, by its kind: a backbone's folds, or the embed or features member."""
    if member.get("kind") == "embed":
        return embed_proba(dataset, member, manifest, paths, device)
    if member.get("kind") == "features":
        return features_proba(dataset, member, manifest, images)
    return member_proba(dataset, member, manifest, images, device)


def predict(dataset: Path, competition: Path, output: Path) -> Path:
    """Write ``output``/submission.csv from the package in ``dataset`` and the competition's test images."""
    sys.path.insert(0, str(dataset / "code"))  # the vendored project and ttach, ahead of anything installed
    import numpy as np
    import pandas as pd
    import torch

    import pipeline
    from pipeline.data.images import load_image
    from pipeline.metrics import predict_labels

    manifest = json.loads((dataset / MANIFEST).read_text())
    print(f"kernel: pipeline from {Path(pipeline.__file__).parent}", file=sys.stderr)
    sample = pd.read_csv(competition / manifest["sample_submission"], dtype=str, keep_default_na=False)
    ids = sample[manifest["id_col"]].tolist()
    paths = test_paths(ids, competition / manifest["test_images"])
    images = np.stack([load_image(p, tuple(manifest["size_hw"]), manifest["channels"]) for p in paths])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    members = manifest["ensemble"]["members"]
    stack = np.stack([one_member(dataset, manifest["members"][name], manifest, images, paths, device)
                      for name in members])
    class_names = manifest["class_names"]
    proba = combine(manifest["ensemble"], members, class_names, stack)
    if manifest["kind"] == "label":
        sample[manifest["target_col"]] = [class_names[i] for i in predict_labels(proba)]
    else:
        for index, name in enumerate(class_names):
            sample[name] = proba[:, index]
    output.mkdir(parents=True, exist_ok=True)
    path = output / "submission.csv"
    sample.to_csv(path, index=False)
    # The ensemble's probabilities too, as the ensemble stage's test.parquet holds them: a check beside the labels.
    pd.DataFrame(proba, columns=class_names).assign(id=ids)[["id", *class_names]].to_csv(output / PROBABILITIES,
                                                                                      index=False)
    print(f"kernel: wrote {path} ({len(sample)} rows; {len(members)} member(s), {manifest['ensemble']['method']})",
          file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Offline inference of the pipeline's package: submission.csv.")
    parser.add_argument("--dataset", type=Path,
                        help="the package's dataset folder (default: found under /kaggle/input)")
    parser.add_argument("--competition", type=Path,
                        help="the competition's folder (default: /kaggle/input/<the package's competition>)")
    parser.add_argument("--output", type=Path, default=Path("/kaggle/working"), help="where submission.csv goes")
    args = parser.parse_args(argv)
    dataset = args.dataset or find_dataset(Path("/kaggle/input"))
    return predict(dataset, args.competition or find_competition(dataset, Path("/kaggle/input")), args.output)


if __name__ == "__main__":
    main()
