"""The EDA's analysis: image statistics, duplicates and near-duplicates (``statistics``), adversarial validation of
train against test (``adversarial``) and the Markdown/HTML report with its figures (``report``).

May import ``data``, the config and the shared pieces; only the eda stage imports it.
"""
