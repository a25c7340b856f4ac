"""The data a run reads: the competition folder (CSV, subfolders, mask layouts, the embedded ELPV builder) and its
labels (``competition``), the decoded image cache and the Dataset that serves it (``images``), and the folds and
probability tables the stages hand each other, read with their ids and classes checked (``stage_tables``).

May import the config and the shared pieces (``layout``, ``artifacts``, ``errors``, ``formula``); never training,
ensembling, analysis or a stage.
"""
