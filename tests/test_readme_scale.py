"""Every command of the README's "Several GPUs, several machines" block is run by a test: the team's DVC remote
lines by tests/test_dvc.py (as written there in TEAM_COMMANDS), every other line by the test named in ELSEWHERE."""

import re
from pathlib import Path

import pytest
from test_dvc import TEAM_COMMANDS

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Several GPUs, several machines"
# What the README writes where TEAM_COMMANDS has a placeholder.
PLACEHOLDERS = {"REMOTE": "s3://bucket/kaggle-cache"}
# README lines (by their start) that other tests run ("tests/FILE.py" or "tests/FILE.py::TEST"), or why none does.
ELSEWHERE = {
    "python -m pipeline train 'train.devices=": "tests/test_devices.py",
    "torchrun --nproc-per-node 2 -m pipeline.train": "tests/test_ddp.py",
    "export OPTUNA_STORAGE=postgresql://": "tests/test_tune.py::test_two_workers_share_one_postgres_study",
    "dvc exp run --queue -S runtime.device=": "queue workers copy the repository: minutes more of CI",
}


def scale_commands(readme: str) -> list[str]:
    """The commands of the section's bash block, comments stripped."""
    block = readme.split(SECTION, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [re.sub(r"\s+#\s.*$", "", line).strip() for line in block.splitlines() if line.strip()]


def untested(readme: str) -> list[str]:
    """The block's commands that neither tests/test_dvc.py runs nor ELSEWHERE names."""
    team = []
    for command in TEAM_COMMANDS:
        for placeholder, value in PLACEHOLDERS.items():
            command = command.replace(placeholder, value)
        team.append(command)
    return [line for line in scale_commands(readme) if line not in team and not line.startswith(tuple(ELSEWHERE))]


def test_every_readme_scale_command_is_run_by_a_test():
    readme = (ROOT / "README.md").read_text()
    commands = scale_commands(readme)
    assert untested(readme) == []
    # Each entry is used, and a named test exists (a reason that is not a path stands for "no test, and why").
    for start, where in ELSEWHERE.items():
        assert any(line.startswith(start) for line in commands), f"no README line starts with {start!r}"
        if where.startswith("tests/"):
            path, _, name = where.partition("::")
            assert (ROOT / path).is_file(), f"{path} does not exist"
            assert not name or f"def {name}(" in (ROOT / path).read_text(), f"{path} has no test {name}"


@pytest.mark.parametrize("line", ["dvc repro && dvc push   # a new line nobody runs",
                                  "dvc remote add -d team s3://another/bucket   # another remote than the test's"])
def test_a_new_or_changed_line_without_a_test_fails_the_check(line):
    readme = (ROOT / "README.md").read_text()
    block_end = readme.index("```", readme.index("```bash\n", readme.index(SECTION)) + len("```bash\n"))
    assert untested(readme[:block_end] + line + "\n" + readme[block_end:]) == [line.split("   #")[0]]
