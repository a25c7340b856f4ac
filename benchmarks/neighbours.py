"""A nearest-neighbour member on a finished run: its CV, and the soft vote's CV with the run's members beside it.

    python benchmarks/neighbours.py WORK [WORK ...] [--size 32] [-k 3] [--temperature 0.1] [--set KEY=VALUE ...]

WORK is a run's work directory (one of ``benchmarks/splits.py``'s, or ``work``): its image cache, folds.csv and the
members' OOF files, read and checked by the ensemble stage's own loader (``--config``, ``--set``: the run's settings).
Each training image's class probabilities come from its ``k`` nearest training images **of the other folds**
(scikit-learn's KNeighborsClassifier; cosine distance between the cached images area-averaged to ``size`` x ``size``
pixels, each minus the fitting rows' mean image), weighted ``exp(-(distance - nearest distance) / temperature)``. No
network and no training: a few seconds a run. Per setting (every combination of the lists) and run it prints the
member's OOF macro-F1 and accuracy, the run's own soft vote of its members, and that vote with the neighbours added
as one more equal member; then the means over the runs. Every figure is an OOF one: each row scored by models that
never saw it. No test label is read. ``--out`` writes the first setting's OOF of the first run (id, fold, classes),
which ``benchmarks/blend_runs.py`` reads.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.neighbors import KNeighborsClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import layout, metrics  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.ensemble import load_members  # noqa: E402
from pipeline.errors import ConfigError, DataError  # noqa: E402
from pipeline.training.linear import training_rows  # noqa: E402
from pipeline.data.images import Cache  # noqa: E402


def downsampled(images: np.ndarray, size: int) -> np.ndarray:
    """N x H x W x C uint8 images -> N x (C * size * size) float32, each pixel the mean of its area."""
    batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return F.interpolate(batch, size=(size, size), mode="area").flatten(1).numpy()


def centred(x: np.ndarray, mean_image: np.ndarray) -> np.ndarray:
    """Each row minus ``mean_image``, then minus its own mean: cosine distance on these rows is 1 - correlation."""
    x = x - mean_image
    return x - x.mean(1, keepdims=True)


def nearest_weights(temperature: float):
    """KNeighborsClassifier's ``weights``: exp(-(d - d_nearest) / temperature) for each query's sorted distances."""
    return lambda distances: np.exp(-(distances - distances[:, :1]) / temperature)


def neighbour_oof(x: np.ndarray, labels: np.ndarray, folds: np.ndarray, n_classes: int, k: int,
                  temperature: float) -> np.ndarray:
    """Every row's probabilities from its k nearest rows of the other folds."""
    oof = np.zeros((len(labels), n_classes))
    for fold in np.unique(folds):
        held = folds == fold
        mean_image = x[~held].mean(0)
        model = KNeighborsClassifier(k, metric="cosine", weights=nearest_weights(temperature))
        model.fit(centred(x[~held], mean_image), labels[~held])
        oof[np.ix_(held, model.classes_)] = model.predict_proba(centred(x[held], mean_image))
    return oof


def run_members(work: Path, config: str, overrides: list[str]) -> tuple:
    """(config, cache, the members as the ensemble stage reads and checks them, each OOF row's place in the cache)."""
    cfg = load_config(config, [*overrides, *layout.overrides_under(work)])
    cache = Cache.open(cfg)
    members = load_members(cfg, cache)
    ids, _, _, rows = training_rows(cfg, cache)
    row_of = dict(zip(ids, rows))
    return cfg, cache, members, np.array([row_of[i] for i in members.ids])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("works", nargs="+", type=Path, help="finished runs' work directories")
    parser.add_argument("--size", nargs="+", type=int, default=[32], help="pixels a side the images are averaged to")
    parser.add_argument("-k", nargs="+", type=int, default=[3], help="neighbours")
    parser.add_argument("--temperature", nargs="+", type=float, default=[0.1], help="of the distance weights")
    parser.add_argument("--config", default="params.yaml", help="the runs' config (its members)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="the runs' overrides")
    parser.add_argument("--out", type=Path, help="the first setting's OOF of the first run, as a parquet file")
    args = parser.parse_args()
    try:
        runs = [run_members(work, args.config, args.set) for work in args.works]
    except (DataError, ConfigError, FileNotFoundError) as error:
        print(f"neighbours: {error} (is every WORK a finished run's work directory?)", file=sys.stderr)
        sys.exit(2)
    print("| size | k | temperature | neighbours: OOF macro-F1 / accuracy | soft vote of the run's members | "
          "with the neighbours | gain in macro-F1 by run |")
    print("|---|---|---|---|---|---|---|")
    first_setting = (args.size[0], args.k[0], args.temperature[0])
    for size in args.size:
        pixels = [downsampled(cache.images("train")[rows], size) for _, cache, _, rows in runs]  # once per size
        for k, temperature in itertools.product(args.k, args.temperature):
            scores = []
            for run_index, ((cfg, cache, members, _), x) in enumerate(zip(runs, pixels)):
                oof = neighbour_oof(x, members.y_true, members.folds, len(cache.class_names), k, temperature)
                if args.out and run_index == 0 and (size, k, temperature) == first_setting:
                    table = pd.DataFrame(oof, columns=cache.class_names).assign(id=members.ids, fold=members.folds)
                    table[["id", "fold", *cache.class_names]].to_parquet(args.out, index=False)
                scores.append([metrics.score(name, members.y_true, proba)
                               for proba in (oof, members.oof.mean(0), np.mean([*members.oof, oof], 0))
                               for name in (cfg.metric, "accuracy")])
            mean = np.mean(scores, 0)
            gains = ", ".join(f"{row[4] - row[2]:+.4f}" for row in scores)
            print(f"| {size} | {k} | {temperature} | {mean[0]:.4f} / {mean[1]:.4f} | {mean[2]:.4f} / {mean[3]:.4f} | "
                  f"{mean[4]:.4f} / {mean[5]:.4f} | {gains} |", flush=True)

if __name__ == "__main__":
    main()
