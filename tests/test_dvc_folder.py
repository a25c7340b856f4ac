"""`dvc repro` on a folder competition (data.source=folder via params): prepare notices a changed or removed image
and what follows re-runs. Its own repository copy, apart from tests/test_dvc.py's, so the two run in parallel."""

import subprocess

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import make_config
from PIL import Image
from repo_copy import copy_repository, dvc_env, stages_run

from pipeline.data.competition import build_elpv

pytestmark = pytest.mark.slow


def run(args, cwd):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=dvc_env(cwd))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_a_changed_or_removed_image_of_a_folder_competition_re_runs_what_follows(tmp_path):
    competition = build_elpv(make_config(tmp_path / "source"))
    repo = copy_repository(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update({"source": "folder", "dir": str(competition)})
    # One backbone, no search: what this test is about (prepare noticing the images) costs half the time.
    params["backbones"], params["tune"]["enabled"] = {"lcnet_050": params["backbones"]["lcnet_050"]}, False
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro"], repo)
    image = sorted((competition / "train").glob("*.png"))[0]
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image)  # other pixels, same id
    changed = stages_run(run(["dvc", "repro"], repo))
    assert {"prepare", "eda", "train@lcnet_050", "ensemble"} <= changed and "folds" not in changed
    train = pd.read_csv(competition / "train.csv", dtype=str)
    train[train["id"] != image.stem].to_csv(competition / "train.csv", index=False)
    image.unlink()
    removed = stages_run(run(["dvc", "repro"], repo))
    assert {"prepare", "folds", "train@lcnet_050", "ensemble"} <= removed
    folds = pd.read_csv(repo / "work" / "folds.csv", dtype=str)
    assert image.stem not in set(folds["id"]) and len(folds) == len(train) - 1



