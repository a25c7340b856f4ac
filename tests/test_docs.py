"""The documentation agrees with the code: the configuration reference is generated from the typed config,
every message the troubleshooting page quotes is one the code can produce, every config key a page names
exists, the README is short, names every module, and its links (and the docs pages') lead to files."""

from __future__ import annotations

import ast
import errno
import os
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline import config as config_module
from pipeline import layout
from pipeline.config.reference import SECTIONS, config_reference, section_model, undocumented

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = "python -m pipeline.config.reference > docs/configuration.md"
DOC_PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
# A run of fixed words is checked when it has at least 3 words or 10 characters (shorter ones mean little).
MIN_RUN_WORDS, MIN_RUN_CHARS = 3, 10

# ---------------------------------------------------------------- configuration reference


def test_the_configuration_page_is_generated_from_the_config():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == config_reference(), f"docs/configuration.md is out of date: run `{REGENERATE}`"


def test_every_key_has_a_description():
    assert undocumented() == [], ("these keys have no description: write a one-line string under each field "
                                  f"in pipeline/config/sections.py, then run `{REGENERATE}`")


def test_the_reference_covers_every_section():
    assert sorted(SECTIONS) == sorted(config_module.Config.model_fields)


# ---------------------------------------------------------------- troubleshooting

# In a quoted message these stand for what the message names (a key, a value, a path, a count): `X`, `N`, `FILE`
# and other capitalised words, `...`, quoted names, [lists], {mappings}, paths and numbers. What is left is the
# message's fixed wording, which must come from the code.
PLACEHOLDER = re.compile(r"""
      '[^']*'                  # a quoted name or value
    | "[^"]*"
    | \[[^\]]*\]               # a list
    | \{[^}]*\}                # a mapping
    | \.\.\.                   # anything
    | \S*/\S*                  # a path
    | \b[A-Z][A-Z_]*\b         # X, N, FILE, PATH, NAME, STAGE ... (also CUDA, CSV: only a run break)
    | \b\w*\d\w*\b             # a number, or a name with digits in it
    | [;:()] | \.(?=\s|$)      # clause and sentence breaks (where the code often joins two strings)
""", re.VERBOSE)


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def fixed_runs(message: str) -> list[str]:
    """The runs of fixed words of a quoted message, placeholders removed: each as 'word word word'."""
    return [" ".join(words(part)) for part in PLACEHOLDER.split(message) if words(part)]


def code_pieces(folder: Path = ROOT / "pipeline") -> list[str]:
    """Every literal piece of every string in the code, as words: an f-string's text between its {fields}.
    Docstrings and pipeline/config/reference.py (the text of a docs page) are prose, not messages, and left out."""
    pieces = []
    for path in sorted(folder.rglob("*.py")):
        if path.name == "reference.py":
            continue
        tree = ast.parse(path.read_text())
        prose = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                pieces += [part.value for part in node.values if isinstance(part, ast.Constant)]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
                pieces.append(node.value)
    return [" ".join(words(piece)) for piece in pieces]


def os_messages() -> list[str]:
    """The operating system's error texts, which messages quote (``cannot write PATH: No space left on device``)."""
    return [" ".join(words(os.strerror(code))) for code in errno.errorcode]


def config_messages() -> list[str]:
    """The messages pydantic gives for bad values of every config key ("Input should be greater than 0")."""
    messages = set()
    models = [model for model in vars(config_module).values()
              if isinstance(model, type) and issubclass(model, config_module.Section) and model is not
              config_module.Section]
    for model in models:
        for name in model.model_fields:
            for value in (-(10 ** 9), 10 ** 9, "no such value", [object()], {"x": 1}, 0.5, None):
                try:
                    model.model_validate({name: value})
                except ValidationError as error:
                    messages |= {item["msg"].removeprefix("Value error, ") for item in error.errors()}
    return [" ".join(words(message)) for message in messages]


def quoted_messages(page: str) -> list[str]:
    """The messages a troubleshooting table quotes: the `code spans` of each row's first column."""
    quoted = []
    for line in page.splitlines():
        if not line.startswith("|") or re.match(r"\|\s*(-+|\*\*|message)", line):
            continue
        first_column = re.split(r"(?<!\\)\|", line)[1]
        quoted += re.findall(r"`([^`]+)`", first_column)
    return quoted


def unmatched_messages(page: str, corpus: list[str]) -> list[str]:
    """Quoted messages with a run of fixed words that no string of the code holds (or with none to check)."""
    padded = [f" {piece} " for piece in corpus]
    problems = []
    for message in quoted_messages(page):
        runs = [run for run in fixed_runs(message) if len(run.split()) >= MIN_RUN_WORDS or len(run) >= MIN_RUN_CHARS]
        missing = [run for run in runs if not any(f" {run} " in piece for piece in padded)]
        if missing or not runs:
            problems.append(f"{message!r}: " + (f"no string in pipeline/ holds {missing}" if runs else
                                                 "no fixed words long enough to check: quote more of it"))
    return problems


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return code_pieces() + config_messages() + os_messages()


def test_the_troubleshooting_page_quotes_only_messages_the_code_has(corpus):
    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    assert len(quoted_messages(page)) >= 40, "the troubleshooting table was not found"
    problems = unmatched_messages(page, corpus)
    assert problems == [], "docs/troubleshooting.md quotes messages the code does not produce:\n" + "\n".join(problems)


def test_the_message_check_sees_a_made_up_message(corpus):
    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    made_up = page + "| `the flux capacitor of FILE is out of range` | a made-up row | nothing |\n"
    assert unmatched_messages(made_up, corpus) == [
        "'the flux capacitor of FILE is out of range': no string in pipeline/ holds "
        "['the flux capacitor of', 'is out of range']"]


def test_placeholders_split_a_message_into_its_fixed_words():
    assert fixed_runs("invalid config FILE: unknown key 'train.lrr'; did you mean 'train.lr'? (valid keys here: ...)") \
        == ["invalid config", "unknown key", "did you mean", "valid keys here"]
    assert fixed_runs("checkpoint .../last.pt cannot be read ([NAME] fold 3)") == [
        "checkpoint", "cannot be read", "fold"]


# ---------------------------------------------------------------- README

def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move detail to docs/"


@pytest.mark.parametrize("page", DOC_PAGES)
def test_relative_links_lead_to_files(page):
    text = (ROOT / page).read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:|#", t)]
    missing = [t for t in relative if not ((ROOT / page).parent / t).exists()]
    assert missing == [], f"{page} links to missing files: {missing}"


def test_the_readme_names_every_module():
    readme = (ROOT / "README.md").read_text()
    top_level = [f"`{path.stem}`" for path in sorted((ROOT / "pipeline").glob("*.py")) if path.stem != "__init__"]
    subpackages = [f"`{path.parent.name}/`" for path in sorted((ROOT / "pipeline").glob("*/__init__.py"))]
    inside = [f"`{path.stem}`" for path in sorted((ROOT / "pipeline").glob("*/*.py")) if path.stem != "__init__"]
    missing = [name for name in top_level + subpackages + inside if name not in readme]
    assert missing == [], f"README.md's code section does not name the module(s) {missing}"


# ---------------------------------------------------------------- config keys named anywhere in the docs

FILE_SUFFIXES = {"csv", "parquet", "npy", "json", "yaml", "py", "png", "pt", "md", "journal", "log"}
TYPO_EXAMPLES = {"train.lrr"}  # the misspelt key the pages show an error message for


def mentioned_keys(text: str) -> set[str]:
    """Dotted config keys a page names, like `train.lr` or `runtime.amp=off` (file names like train.csv are not)."""
    sections = "|".join(name for name in SECTIONS if section_model(name))
    return {f"{section}.{key}" for section, key in re.findall(rf"(?<![\w./-])({sections})\.([a-z_]+)\b", text)
            if key not in FILE_SUFFIXES}


def unknown_keys(text: str) -> list[str]:
    """The dotted keys a page names that no config section has."""
    unknown = [key for key in mentioned_keys(text) if key not in TYPO_EXAMPLES]
    return sorted(key for key in unknown if key.split(".")[1] not in section_model(key.split(".")[0]).model_fields)


@pytest.mark.parametrize("page", DOC_PAGES)
def test_pages_name_only_keys_the_config_has(page):
    assert unknown_keys((ROOT / page).read_text()) == [], f"{page} names config keys that do not exist"


def test_the_key_check_sees_a_renamed_key():
    assert unknown_keys("set `train.amp=off` or `runtime.amp=off`; see train.csv and folds.csv") == ["train.amp"]


# ---------------------------------------------------------------- the stage tables agree with layout

def table_rows(page: str, header: str) -> dict[str, str]:
    """The rows of the Markdown table under ``header`` (its first line), by the `name` in their first column."""
    lines = page[page.index(header):].splitlines()[2:]
    rows = {}
    for line in lines:
        if not line.startswith("|"):
            break
        match = re.match(r"\|\s*`([^`]+)`", line)
        if match:
            rows[match.group(1)] = line
    return rows


def missing_outputs(rows: dict[str, str]) -> list[str]:
    """Each stage's outputs (``layout.stage_outputs``, a backbone as ``<backbone>``) that its row does not name."""
    from pipeline.config import load_config

    cfg = load_config(None, ["backbones=[BACKBONE]"])
    missing = [f"{stage}: no row" for stage in layout.STAGES if stage not in rows]
    for stage in layout.STAGES:
        backbone = "BACKBONE" if stage in ("tune", "train", "infer") else None
        for path in layout.stage_outputs(cfg, stage, backbone):
            name = path.name.replace("BACKBONE", "<backbone>")
            if stage in rows and name not in rows[stage]:
                missing.append(f"{stage}: {name}")
    return missing


def test_the_stage_tables_name_every_stage_and_what_it_writes():
    readme = (ROOT / "README.md").read_text()
    assert set(table_rows(readme, "| `pipeline/` | stage |")) == set(layout.STAGES), (
        "README's stage table differs from the stages")
    stages_page = (ROOT / "docs" / "stages.md").read_text()
    assert missing_outputs(table_rows(stages_page, "| stage | writes |")) == []


def test_the_stage_table_check_sees_a_missing_output():
    page = (ROOT / "docs" / "stages.md").read_text().replace("folds_balance.csv", "balance.csv")
    assert missing_outputs(table_rows(page, "| stage | writes |")) == ["folds: folds_balance.csv"]


def test_the_results_page_is_generated_from_the_result_files():
    import importlib.util

    spec = importlib.util.spec_from_file_location("results", ROOT / "benchmarks" / "results.py")
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    page = (ROOT / "docs" / "results.md").read_text()
    assert page == results.page(), (
        "docs/results.md is out of date: run `python benchmarks/results.py > docs/results.md`")
    for _, files, _ in results.SECTIONS:
        for file in (files,) if isinstance(files, str) else files:
            if (ROOT / file).is_file():
                assert f"`{file}`" in page
