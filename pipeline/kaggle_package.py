"""The code-competition package: the trained folds and the ensemble as a Kaggle dataset, and the kernel that predicts.

Reads:  each backbone's trained folds (``paths.models``, the checkpoints infer would read, checked the same way),
        ``paths.ensemble``/weights.json, ``paths.metrics``/ensemble.json, ``paths.cache``/meta.json; with the embed
        and features members, their regressions.npz and the weight files of ``embed.backbones``.
Writes: ``<paths.work_dir>/kaggle/``
          dataset/  dataset-metadata.json (the kaggle CLI's), pipeline-package.json (what the kernel needs: classes,
                    image size, TTA, each member's checkpoints, the ensemble's method and weights), config.yaml (the
                    resolved config), models/<backbone>/fold<k>.pt (and refit.pt), models/embed/ and
                    models/features/ (those members' regressions.npz, embed's backbone<i> weight files),
                    weights.json, and code/: the ``pipeline`` package and ttach, vendored, so the kernel imports them
                    offline;
          kernel/   kernel-metadata.json (a private script kernel, internet off, the dataset and the competition as
                    its sources) and inference.py (``pipeline/kaggle_notebook.py``).

``python -m pipeline.kaggle_package`` after ``dvc repro``; ``submit.upload`` with ``submit.code_competition`` pushes
both folders with the kaggle CLI (``pipeline.kaggle.push``). The kernel runs what ``infer`` and ``ensemble`` ran on the
test images: the members that train no network too (the regressions their stages saved go into ``models/embed/`` and
``models/features/``, with the embed backbones' weight files), but not ``stacking`` (its stacker is not kept), which
is refused here.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import yaml

from pipeline import cli, layout, provenance
from pipeline.artifacts import atomic_dir, read_json
from pipeline.config import Config
from pipeline.data.images import Cache
from pipeline.errors import ConfigError, DataError
from pipeline.kaggle_notebook import MANIFEST
from pipeline.training import embedding, weights
from pipeline.training.checkpoints import load_checkpoint
from pipeline.training.kfold import load_training_data, tuned_config
from pipeline.training.pseudo import trained_folds
from pipeline.training.refit import check_refit

PACKAGE = Path(__file__).resolve().parent
KERNEL_CODE = "inference.py"


def check_packable(cfg: Config, ensemble: dict) -> None:
    """Everything the kernel cannot do, named with the key that changes it, before any file is written."""
    problems = []
    for key in ("competition", "kaggle_user"):
        if not getattr(cfg.submit, key):
            problems.append(f"submit.{key} is not set")
    if cfg.data.layout != "csv":
        problems.append(f"data.layout is {cfg.data.layout!r}: the kernel finds the test images by the sample "
                        f"submission's ids (data.layout: csv)")
    others = [name for name in ensemble["members"] if name not in cfg.backbones and name not in FITTED]
    if others:
        problems.append(f"the ensemble's member(s) {others} are neither backbones nor members the kernel knows: "
                        f"re-run the ensemble stage (dvc repro)")
    if layout.EMBED_MEMBER in ensemble["members"]:
        hub = [name for name in cfg.embed.backbones if not weights.packaged_key(name) and "=" not in name]
        if hub:
            problems.append(f"embed.backbones {hub}: timm hub weights, which the kernel (internet off) cannot "
                            f"download: name a packaged weight ({', '.join(weights.PACKAGED)}) or a file as "
                            f"timm_model=path, or set embed.enabled=false")
    if ensemble["base_method"] == "stacking":
        problems.append("ensemble.method chose stacking, whose stacker is not kept: choose another ensemble.method")
    if problems:
        raise ConfigError("cannot package a code-competition kernel: " + "; ".join(problems))


def member_checkpoints(cfg: Config, backbone: str) -> dict:
    """{"folds": [checkpoint paths], "refit": path or None, "refit_weight"} of a backbone, checked as infer checks."""
    cfg = cfg.for_backbone(backbone)
    folds = []
    for _, folder, expected_key in trained_folds(cfg, backbone):
        path = folder / layout.checkpoint_name(cfg.infer.checkpoint)
        if load_checkpoint(path).get("key") != expected_key:
            raise DataError(f"checkpoint {path} was trained with other settings, images, folds or training code than "
                            f"the current ones: re-run train for {backbone} (dvc repro does)")
        folds.append(path)
    refit = None
    if cfg.train.refit:
        refit = layout.refit_dir(cfg, backbone) / layout.checkpoint_name("best")
        tuned = tuned_config(cfg, backbone)
        if not check_refit(load_checkpoint(refit), tuned, backbone, load_training_data(tuned)):
            raise DataError(f"checkpoint {refit} was trained with other settings than the current ones: re-run train "
                            f"for {backbone}")
    return {"folds": folds, "refit": refit, "refit_weight": cfg.infer.refit_weight}


def saved_regressions(path: Path, member: str, current: dict, saved: dict) -> None:
    """Refuse a member's regressions (``path``) whose ``saved`` settings differ from the ``current`` ones."""
    changed = [key for key, value in current.items() if saved.get(key) != value]
    if changed:
        raise DataError(f"the {member} member's regressions {path} were fitted with other {', '.join(changed)} than "
                        f"the current ones: re-run the {member} stage (dvc repro does)")


def embed_files(cfg: Config, cache: Cache) -> dict:
    """{"regressions": the embed stage's saved regressions, "weights": each backbone's weights file}, checked against
    the current config and image cache: regressions fitted with other settings are refused."""
    path = layout.embed_dir(cfg) / layout.EMBED_REGRESSIONS
    meta, _ = embedding.load_regressions(path)
    settings = cfg.embed
    current = {"backbones": list(settings.backbones), "image_size": settings.image_size, "tta": settings.tta,
               "stages": settings.stages, "channels": cfg.data.channels, "class_names": cache.class_names}
    saved_regressions(path, layout.EMBED_MEMBER, current,
                      {**meta, "backbones": [backbone["name"] for backbone in meta["backbones"]]})
    files = [embedding.backbone_source(name)[1] for name in settings.backbones]
    return {"kind": layout.EMBED_MEMBER, "regressions": path, "weights": files, "batch_size": settings.batch_size}


def features_files(cfg: Config, cache: Cache) -> dict:
    """{"regressions": the features stage's saved filters and regressions}, checked against the current
    ``features.*``, image size, channels and classes."""
    path = layout.features_dir(cfg) / layout.FEATURES_REGRESSIONS
    meta, _ = embedding.load_regressions(path)
    current = {"settings": cfg.features.model_dump(exclude={"enabled"}), "size_hw": list(cfg.data.size_hw),
               "channels": cfg.data.channels, "class_names": cache.class_names}
    saved_regressions(path, layout.FEATURES_MEMBER, current, meta)
    return {"kind": layout.FEATURES_MEMBER, "regressions": path, "weights": []}


FITTED = {layout.EMBED_MEMBER: embed_files, layout.FEATURES_MEMBER: features_files}  # the members without a network


def copy_fitted(out: Path, files: dict) -> dict:
    """A member's regressions (and the embed member's backbone weights) copied under ``models/<member>/``; its
    manifest entry."""
    target = Path("models") / files["kind"]
    (out / target).mkdir(parents=True)
    shutil.copyfile(files["regressions"], out / target / layout.MEMBER_REGRESSIONS)
    copied = []
    for index, path in enumerate(files["weights"]):
        copied.append(str(target / f"backbone{index}{Path(path).suffix}"))
        shutil.copyfile(path, out / copied[-1])
    return {**files, "regressions": str(target / layout.MEMBER_REGRESSIONS), "weights": copied}


def manifest(cfg: Config, cache: Cache, ensemble: dict, members: dict, cv: float) -> dict:
    """What the kernel reads: the cache's classes and image format, infer's TTA, the members' files, the ensemble."""
    return {"competition": cfg.submit.competition, "class_names": cache.class_names, "id_col": cache.meta["id_col"],
            "target_col": cache.meta["target_col"], "kind": cfg.submit.kind, "size_hw": list(cfg.data.size_hw),
            "channels": cfg.data.channels, "sample_submission": Path(cfg.data.sample_submission).name,
            "test_images": cfg.data.test_images, "tta": cfg.infer.tta, "merge": cfg.infer.merge,
            "batch_size": cfg.runtime.eval_batch_size, "amp": cfg.runtime.amp,
            "channels_last": cfg.runtime.channels_last, "members": members,
            "ensemble": {key: ensemble.get(key) for key in ("method", "base_method", "weights", "class_offsets",
                                                              "members")},
            "cv": cv, "config": provenance.config_digest(cfg)}


def write_dataset(cfg: Config, folder: Path, dataset_id: str, checkpoints: dict, content: dict) -> None:
    """The dataset folder: metadata, manifest, config, checkpoints (renamed by backbone and fold), vendored code."""
    import ttach

    with atomic_dir(folder) as out:
        members = {}
        for backbone, files in checkpoints.items():
            if "regressions" in files:
                members[backbone] = copy_fitted(out, files)
                continue
            target = Path("models") / layout.slug(backbone)
            (out / target).mkdir(parents=True)
            folds = []
            for index, path in enumerate(files["folds"]):
                shutil.copyfile(path, out / target / f"fold{index}.pt")
                folds.append(str(target / f"fold{index}.pt"))
            refit = None
            if files["refit"]:
                refit = str(target / "refit.pt")
                shutil.copyfile(files["refit"], out / refit)
            members[backbone] = {"folds": folds, "refit": refit, "refit_weight": files["refit_weight"]}
        title = f"{cfg.submit.competition} pipeline models"[:50]
        (out / "dataset-metadata.json").write_text(json.dumps(
            {"title": title, "id": dataset_id, "licenses": [{"name": "CC0-1.0"}]}, indent=2))
        (out / MANIFEST).write_text(json.dumps({**content, "members": members}, indent=2))
        (out / "config.yaml").write_text(yaml.safe_dump(provenance.public_config(cfg), sort_keys=False))
        shutil.copyfile(layout.ensemble_dir(cfg) / layout.ENSEMBLE_WEIGHTS, out / layout.ENSEMBLE_WEIGHTS)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(PACKAGE, out / "code" / "pipeline", ignore=ignore)
        shutil.copytree(Path(ttach.__file__).parent, out / "code" / "ttach", ignore=ignore)


def write_kernel(cfg: Config, folder: Path, dataset_id: str) -> str:
    """The kernel folder: its metadata (internet off, the dataset and the competition attached) and the script."""
    slug = f"{cfg.submit.competition}-pipeline-inference"[:50].strip("-")
    kernel_id = f"{cfg.submit.kaggle_user}/{slug}"
    with atomic_dir(folder) as out:
        (out / "kernel-metadata.json").write_text(json.dumps({
            "id": kernel_id, "title": slug.replace("-", " "), "code_file": KERNEL_CODE, "language": "python",
            "kernel_type": "script", "is_private": True, "enable_gpu": True, "enable_internet": False,
            "dataset_sources": [dataset_id], "competition_sources": [cfg.submit.competition],
            "kernel_sources": [], "model_sources": []}, indent=2))
        shutil.copyfile(PACKAGE / "kaggle_notebook.py", out / KERNEL_CODE)
    return kernel_id


def main(cfg: Config) -> dict:
    ensemble = read_json(layout.ensemble_dir(cfg) / layout.ENSEMBLE_WEIGHTS, "ensemble weights", "the ensemble stage")
    check_packable(cfg, ensemble)
    cache = Cache.open(cfg)
    cv = float(read_json(layout.ensemble_scores_file(cfg), "ensemble scores", "the ensemble stage")["ensemble_cv"])
    checkpoints = {name: FITTED[name](cfg, cache) if name in FITTED else member_checkpoints(cfg, name)
                   for name in ensemble["members"]}
    dataset_id = f"{cfg.submit.kaggle_user}/" + f"{cfg.submit.competition}-pipeline-models"[:50].strip("-")
    package = layout.kaggle_package_dir(cfg)
    write_dataset(cfg, package / "dataset", dataset_id, checkpoints, manifest(cfg, cache, ensemble, {}, cv))
    kernel_id = write_kernel(cfg, package / "kernel", dataset_id)
    files = sum(len(c["folds"]) + bool(c["refit"]) for c in checkpoints.values() if "folds" in c)
    print(f"kaggle_package: dataset {dataset_id} ({files} checkpoints, {ensemble['method']} of "
          f"{len(checkpoints)} member(s), CV {cv:.4f}) and kernel {kernel_id} in {package}; push them with "
          f"submit.upload=true submit.code_competition=true, or kaggle datasets create -p {package / 'dataset'} "
          f"--dir-mode zip and kaggle kernels push -p {package / 'kernel'}", file=sys.stderr)
    return {"dataset": dataset_id, "kernel": kernel_id, "checkpoints": files, "folder": str(package)}


if __name__ == "__main__":
    cli.run(main, "Package the trained folds and the ensemble as a Kaggle dataset and an offline inference kernel.")
