"""The results page, written from the committed result files: ``python benchmarks/results.py > docs/results.md``.

Each section is one JSON file that ``benchmarks/splits.py`` wrote (its runs: CV, Public, Private, the whole hidden
test of the submission and of each member, minutes), with the command that wrote it. ``tests/test_docs.py`` fails
when the page differs from what this prints, so a figure on it always comes from a file and a command.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (title, result file, what it is). The newest first.
SECTIONS = [
    ("The default on three ELPV splits", "benchmarks/splits_embed_views.json",
     "The default (`params.yaml`): the embed member averages its pooled features over four views of each image "
     "(`embed.tta: [hflip, vflip]`, C 0.03), chosen on the soft vote's CV of these three splits' training rows "
     "(`benchmarks/embed_views.json`). Split 0 is `dvc repro` on a fresh clone of 3ff4245 "
     "(`benchmarks/fresh_clone_3ff4245.json`: its embed member at C 0.003), splits 1 and 2 the splits benchmark at "
     "3ff4245 (`benchmarks/splits_embed_views_c0003.json`); all three re-run from the embed stage on at C 0.03 "
     "(minutes: those stages'). Their fine-tuned members were trained on 2026-12-08's machine and differ from those "
     "of the sections below (split 0's test macro-F1 0.6081 against 0.6403): the two are not paired."),
    ("Before embed.tta: the default on five ELPV splits and the folder copy", "benchmarks/splits_embed_stages.json",
     "The default of 7e3afac: the embed member reads Lite0's last two feature stages beside its final map "
     "(`embed.stages: 2`, C 0.01), chosen on the CV of these five splits' training rows "
     "(`benchmarks/embed_stages.json`). The runs are those of the sections below, re-run from the embed stage on; the "
     "fine-tuned and features members are theirs (minutes: those stages')."),
    ("Before embed.stages: the default on three ELPV splits", "benchmarks/splits_pretrained.json",
     "The pretrained default of 2026-12-07 (the embed member on Lite0's final map only, C 0.03): split 0 from "
     "`dvc repro` on a fresh clone, splits 1 and 2 with the splits benchmark. Everything was chosen on split 0's "
     "CV; splits 1 and 2 are the check on splits nobody tuned on."),
    ("Before embed.stages: the default on the folder copy of split 0", "benchmarks/splits_pretrained_folder.json",
     "Split 0's competition copied as a folder competition with other column names and string labels "
     "(`data.source=folder`): the same recipe through the other reader. The first row is split 0 itself."),
    ("Before embed.stages: the default on five ELPV splits", ("benchmarks/splits_pretrained.json",
                                                               "benchmarks/splits_pretrained_seeds34.json"),
     "Splits 0-2 above and split seeds 3 and 4, run once every setting was fixed: more splits nobody tuned on."),
    ("Before embed.stages: configs/cpu-long.yaml on split 0", "benchmarks/splits_cpu_long_seed0.json",
     "The hour-long CPU preset: a second fine-tuned backbone (Lite1), 12 epochs, embed with Lite0 and Lite1, a second "
     "features dictionary."),
]
COLUMNS = [("cv", "CV"), ("public", "Public"), ("private", "Private"), ("test_accuracy", "test accuracy"),
           ("test_macro_f1", "test macro-F1"), ("best_member_test_macro_f1", "best member's test macro-F1"),
           ("minutes", "minutes")]


def number(value, digits: int = 4) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"  # NaN: a run scored, not timed


def members(runs: list[dict]) -> list[str]:
    """The members whose whole-test macro-F1 the runs report (``<member>_test_macro_f1``)."""
    names = [key.removesuffix("_test_macro_f1") for key in runs[0] if key.endswith("_test_macro_f1")]
    return [name for name in names if name not in ("test", "best_member")]


def load(files: tuple[str, ...]) -> tuple[list[dict], list[str]]:
    """The runs of the result files, in order, and the commands that wrote them."""
    runs, commands = [], []
    for file in files:
        data = json.loads((ROOT / file).read_text())
        runs += data["runs"]
        commands += data.get("commands") or ([data["command"]] if data.get("command") else [])
    return runs, commands


def section(title: str, file: str | tuple[str, ...], what: str) -> str:
    files = (file,) if isinstance(file, str) else file
    missing = [name for name in files if not (ROOT / name).is_file()]
    if missing:
        return f"## {title}\n\n{what}\n\nNot measured yet (`{missing[0]}` does not exist).\n"
    runs, commands = load(files)
    names = members(runs)
    header = [label for _, label in COLUMNS[:-1]] + [f"{name} test macro-F1" for name in names] + ["minutes"]
    keys = [key for key, _ in COLUMNS[:-1]] + [f"{name}_test_macro_f1" for name in names] + ["minutes"]
    lines = [f"## {title}", "", what, "", "| run | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    lines += [f"| {run['run']} | " + " | ".join(number(run.get(key), 1 if key == "minutes" else 4) for key in keys)
              + " |" for run in runs]
    if len(runs) > 1:
        cells = []
        for key in keys:
            values = [run[key] for run in runs if run.get(key) is not None and run[key] == run[key]]
            digits = 1 if key == "minutes" else 4
            cells.append(f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
                         if len(values) > 1 else number(values[0] if values else None, digits))
        lines.append("| mean ± sample std | " + " | ".join(cells) + " |")
    sources = ", ".join(f"`{name}`" for name in files)
    lines += ["", f"From {sources}" + (", written by:" if commands else ".")]
    lines += [f"- `{command}`" for command in commands]
    return "\n".join(lines) + "\n"


def page() -> str:
    intro = ("# Results\n\n<!-- Generated by `python benchmarks/results.py > docs/results.md`; do not edit. -->\n\n"
             "Whole hidden test figures of the embedded ELPV competition: accuracy and macro-F1 over every row of "
             "`solution.csv` (Public and Private together), of the submission and of each member alone. The test "
             "labels are read only to print these; every setting was chosen on cross-validation. CV is the "
             "ensemble's cross-fitted OOF macro-F1. The published ImageNet VGG-19 reaches accuracy 0.805 and "
             "macro-F1 0.61 (Song et al. 2024, epoch chosen on the test split). How the settings were chosen: "
             "[study.md](study.md).\n")
    return "\n".join([intro, *(section(*spec) for spec in SECTIONS)])


if __name__ == "__main__":
    sys.stdout.write(page())
