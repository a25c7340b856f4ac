"""Fitting the members: what tune, train and infer share to fit and run a network (models and pretrained weights,
losses, augmentation, one fold's setup and epoch loop, k-fold cross-validation with resume, devices and DDP, refit,
pseudo-labels, the per-epoch loggers, Optuna studies), and the per-fold logistic regression of the members that
train no network (``linear``: the features and embed stages; ``embedding``: their features and saved regressions,
which the code-competition kernel imports without scikit-learn).

May import ``data``, the config and the shared pieces; never ensembling, analysis or a stage. The fold settings key
digests this subpackage's code as parsed (``pipeline.provenance.training_code_digest``): an edit here that changes
what runs retrains a fold, a comment or docstring does not.
"""
