"""The README stays true: its teacher table is the CLI's output, and it holds the two set-up commands."""

from pathlib import Path

from multiteach.teachers.describe import render

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_teacher_table_matches_cli():
    text = README.read_text()
    table = text.split("<!-- teachers-table:start -->")[1].split("<!-- teachers-table:end -->")[0].strip()
    assert table == render(), "README teacher table is stale: paste the output of `multiteach teachers`"


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in README.read_text()
