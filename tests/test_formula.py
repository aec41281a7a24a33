"""Formula files: valid ones load; bad ones fail naming the file and the line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.errors import FormulaError
from workers.formula import load_formula, parse_formula

GOOD = """name = "gardener"

[context]
files = ["README.md", "ops:journal.md"]

[[steps]]
id = "survey"
title = "Survey"
description = "Look around."

[[steps]]
id = "prune"
title = "Prune"
description = "Remove dead code."
"""


def test_a_valid_formula_loads(tmp_path: Path) -> None:
    path = tmp_path / "gardener.toml"
    path.write_text(GOOD)
    formula = load_formula(path)
    assert formula.name == "gardener"
    assert [s.id for s in formula.steps] == ["survey", "prune"]
    assert formula.context_files == ("README.md", "ops:journal.md")
    assert formula.text == GOOD


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("name = \n", "f.toml: not valid TOML: Invalid value (at line 1, column 8)"),
        (
            "[[steps]]\nid='a'\ntitle='t'\ndescription='d'\n",
            "f.toml: 'name' must be a non-empty string",
        ),
        ('name = ""\n', "f.toml:1: 'name' must be a non-empty string"),
        ('name = "x"\n', "f.toml: has no steps: add at least one [[steps]] table"),
        ('name = "x"\nsteps = []\n', "f.toml: has no steps"),
        (
            'name = "x"\n\n[[steps]]\nid = "a"\ntitle = "t"\ndescription = "d"\n\n'
            '[[steps]]\nid = "b"\n',
            "f.toml:8: steps[1] needs 'title' as a non-empty string",
        ),
        (
            'name = "x"\n[[steps]]\nid = "a"\ntitle = "t"\ndescription = "d"\n'
            '[[steps]]\nid = "a"\ntitle = "t"\ndescription = "d"\n',
            "f.toml:6: steps[1]: id 'a' is used twice",
        ),
        (
            'name = "x"\ncontext = 3\n[[steps]]\nid="a"\ntitle="t"\ndescription="d"\n',
            "f.toml:2: 'context' must be a table",
        ),
        (
            'name = "x"\n[context]\nfiles = "README.md"\n'
            '[[steps]]\nid="a"\ntitle="t"\ndescription="d"\n',
            "f.toml:3: [context] files must be an array of strings",
        ),
    ],
)
def test_bad_formulas_name_file_and_line(text: str, problem: str) -> None:
    with pytest.raises(FormulaError) as caught:
        parse_formula(text, Path("f.toml"))
    assert problem in str(caught.value)
    assert str(caught.value).startswith("formula f.toml")


def test_missing_directory_binary_and_huge_formulas(tmp_path: Path) -> None:
    with pytest.raises(FormulaError, match="not found"):
        load_formula(tmp_path / "nope.toml")
    with pytest.raises(FormulaError, match="is a directory"):
        load_formula(tmp_path)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b'name = "\xff"\n')
    with pytest.raises(FormulaError, match="not UTF-8 text"):
        load_formula(binary)
    huge = tmp_path / "huge.toml"
    huge.write_text("# " + "x" * (1024 * 1024 + 10))
    with pytest.raises(FormulaError, match="larger than"):
        load_formula(huge)


@given(st.text(max_size=400))
def test_any_text_loads_or_fails_with_a_formula_error(text: str) -> None:
    try:
        formula = parse_formula(text, Path("f.toml"))
    except FormulaError as exc:
        assert str(exc).startswith("formula f.toml")
    else:
        assert formula.name and formula.steps
