"""What a trained fold's key digests of the code: the parsed training code, never its comments or docstrings."""

from pathlib import Path

from pipeline import provenance


def package(tmp_path: Path, files: dict[str, str]) -> Path:
    """A throwaway ``pipeline`` package of the given files (dotted name -> source)."""
    root = tmp_path / "pipeline"
    for name, source in files.items():
        path = provenance.module_file(name, root)
        if name in files and "." not in name and any(other.startswith(name + ".") for other in files):
            path = root / name / "__init__.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root


LOSS = '''"""Losses."""

# the weight of the rare class
WEIGHT = 2.0


def loss(x):
    """The loss."""
    return x * WEIGHT
'''


def test_comments_docstrings_and_line_breaks_do_not_change_the_code_text(tmp_path):
    edited = LOSS.replace('"""Losses."""', '"""Losses, a typo fixed."""').replace(
        "# the weight", "# the corrected weight").replace('"""The loss."""', '"""The loss,\n    explained."""')
    one, two = tmp_path / "one.py", tmp_path / "two.py"
    one.write_text(LOSS)
    two.write_text(edited + "\n\n# a trailing comment\n")
    assert provenance.code_text(one) == provenance.code_text(two)
    two.write_text(LOSS.replace("x * WEIGHT", "x * WEIGHT + 0"))
    assert provenance.code_text(one) != provenance.code_text(two)


def test_a_function_whose_body_is_only_a_docstring_still_parses_to_code(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('def f():\n    """Only words."""\n')
    assert "Pass" in provenance.code_text(path)


def test_the_training_digest_covers_training_and_data_but_not_layout(tmp_path):
    files = {"training": '"""Training."""\n', "data": '"""Data."""\n',
             "training.kfold": "from pipeline import layout\nfrom pipeline.training import losses\n"
                               "from pipeline.data.images import Cache\n",
             "training.losses": LOSS, "data.images": "Cache = 1\n", "layout": "WORK = 'work'\n",
             "training.studies": "STUDY = 1\n"}
    root = package(tmp_path, files)
    assert provenance.imported_modules("training.kfold", root) == [
        "data", "data.images", "layout", "training", "training.kfold", "training.losses"]
    digest = provenance.training_code_digest.__wrapped__  # the cached one would remember the first package

    before = digest("training.kfold", root)
    (root / "layout.py").write_text("WORK = 'elsewhere'\n")  # where files go: not what a fold computes
    (root / "training" / "studies.py").write_text("STUDY = 2\n")  # not imported by the k-fold loop
    (root / "training" / "losses.py").write_text(LOSS.replace("# the weight", "# the heavier weight"))
    assert digest("training.kfold", root) == before
    (root / "training" / "losses.py").write_text(LOSS.replace("2.0", "3.0"))
    assert digest("training.kfold", root) != before
    (root / "training" / "losses.py").write_text(LOSS)
    (root / "data" / "images.py").write_text("Cache = 2\n")
    assert digest("training.kfold", root) != before


def test_a_stage_digest_covers_the_stage_itself(tmp_path):
    root = package(tmp_path, {"training": "", "training.loop": "STEP = 1\n", "layout": "",
                              "tune": "from pipeline import layout\nfrom pipeline.training import loop\nN = 1\n"})
    digest = provenance.training_code_digest.__wrapped__
    before = digest("tune", root)
    (root / "tune.py").write_text((root / "tune.py").read_text().replace("N = 1", "N = 2"))
    assert digest("tune", root) != before


def test_direct_imports_name_modules_by_their_dotted_path(tmp_path):
    root = package(tmp_path, {"training": "", "training.loop": "", "training.kfold": "", "layout": "",
                              "config": "", "config.sections": ""})
    source = tmp_path / "stage.py"
    source.write_text("from pipeline import layout\nfrom pipeline.training import loop\n"
                      "from pipeline.training.kfold import train_fold\nfrom pipeline.config import Config\n"
                      "import pipeline.config.sections\n")
    assert provenance.direct_imports(source, root) == {"layout", "training", "training.loop", "training.kfold",
                                                       "config", "config.sections"}
