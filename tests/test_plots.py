"""What `dvc plots show` shows, drawn right: the folds' curves as one table per metric with a fold column, the
confusion matrix normalised per true class with the counts, the ensemble's correlation on a scale that tells
its pairs apart. (That DVC renders them all without a warning: tests/test_dvc_plots.py.)"""

import numpy as np
import pandas as pd
from conftest import make_config

from pipeline import ensemble, layout, train
from pipeline.training import kfold

BACKBONE = "lcnet_050"


def test_the_confusion_matrix_is_normalised_per_true_class_with_the_counts():
    # 4 images of class a (3 right), 1 of class b (wrong): raw counts would paint b's row as nearly empty.
    figure = train.confusion_figure(np.array([0, 0, 0, 0, 1]), np.array([0, 0, 0, 1, 0]), ["a", "b"], "t")
    axis = figure.axes[0]
    cells = [text.get_text() for text in axis.texts]
    assert cells == ["0.75\n(3)", "0.25\n(1)", "1.00\n(1)", "0.00\n(0)"]
    np.testing.assert_allclose(axis.images[0].get_array(), [[0.75, 0.25], [1.0, 0.0]])
    assert axis.images[0].get_clim() == (0.0, 1.0)


def test_fold_curves_are_one_table_per_metric_with_a_fold_column(tmp_path):
    cfg = make_config(tmp_path / "work")
    results = [kfold.FoldResult(fold, 0.5, 1, np.arange(2), np.zeros((2, 2)), history) for fold, history in
               [(0, [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "seconds": 3.0},
                     {"epoch": 2, "train_loss": 0.8, "val_loss": 0.7, "seconds": 3.0}]),
                (1, [{"epoch": 1, "train_loss": 1.1, "val_loss": 1.0, "seconds": 2.0}])]]
    folder = layout.fold_curves_dir(cfg, BACKBONE)
    (folder / "old_metric.tsv").parent.mkdir(parents=True)
    (folder / "old_metric.tsv").write_text("epoch\tfold\told_metric\n")
    train.write_fold_curves(cfg, BACKBONE, results)
    assert sorted(p.name for p in folder.iterdir()) == ["train_loss.tsv", "val_loss.tsv"]  # the stale one is gone
    table = pd.read_csv(folder / "val_loss.tsv", sep="\t")
    assert list(table.columns) == ["epoch", "fold", "val_loss"]  # the value last: DVC's y when none is named
    assert table.values.tolist() == [[1, 0, 0.9], [2, 0, 0.7], [1, 1, 1.0]]


def test_the_correlation_colours_run_from_the_least_correlated_pair_to_one():
    rng = np.random.default_rng(0)
    base = rng.dirichlet(np.ones(3), size=50)
    noisy = [np.clip(base + rng.normal(0, scale, base.shape), 0.01, None) for scale in (0.01, 0.05, 0.1)]
    members = ensemble.Members(names=["a", "b", "c"], sources={}, ids=np.arange(50), folds=np.zeros(50),
                               y_true=np.zeros(50), oof=np.stack(noisy), test_ids=np.arange(1),
                               test=np.zeros((3, 1, 3)))
    axis = ensemble.correlation_figure(members).axes[0]
    correlation = np.corrcoef(members.oof.reshape(3, -1))
    lowest = correlation[~np.eye(3, dtype=bool)].min()
    assert 0.5 < lowest < 0.99  # alike members: on a 0..1 scale every pair would get nearly one colour
    assert axis.images[0].get_clim() == (lowest, 1.0)
    assert np.ma.getmaskarray(axis.images[0].get_array()).tolist() == np.eye(3, dtype=bool).tolist()  # 1s greyed
    assert [text.get_text() for text in axis.texts] == [f"{value:.3f}" for value in correlation.ravel()]
