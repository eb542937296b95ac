"""The notebook contract: every analysis notebook is a synced MyST/ipynb pair with a
`parameters` cell, tells its story in a fixed order, and keeps analysis code in the library."""

import ast
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("*.md"))


def _code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def test_there_are_notebooks():
    assert SOURCES, f"no MyST notebooks in {NOTEBOOKS}"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_pair_exists_and_is_in_sync(source):
    paired = source.with_suffix(".ipynb")
    assert paired.is_file(), f"{source.name} has no paired {paired.name}; run `jupytext --sync {source}`"
    text_nb = jupytext.read(source)
    stored = nbformat.read(paired, as_version=4)
    mine = [(c.cell_type, c.source.strip()) for c in text_nb.cells]
    theirs = [(c.cell_type, c.source.strip()) for c in stored.cells]
    assert mine == theirs, (
        f"{paired.name} is out of sync with {source.name}; run `jupytext --sync {source}` and re-execute"
    )
    for ours, stored_cell in zip(_code_cells(text_nb), _code_cells(stored)):
        assert ours.metadata.get("tags", []) == stored_cell.metadata.get("tags", [])


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_stored_outputs_are_from_one_clean_run(source):
    stored = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    cells = _code_cells(stored)
    counts = [cell.execution_count for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), f"{source.stem}.ipynb is not one top-to-bottom run: {counts}"
    for cell in cells:
        for output in cell.outputs:
            assert output.output_type != "error", f"{source.stem}.ipynb stores an error output"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_parameters_cell(source):
    nb = jupytext.read(source)
    first = _code_cells(nb)[0]
    assert "parameters" in first.metadata.get("tags", []), "the first code cell must be tagged `parameters`"
    values = {}
    for node in ast.parse(first.source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, "the parameters cell only assigns"
        values[node.targets[0].id] = ast.literal_eval(node.value)
    assert list(values)[:3] == ["input_path", "output_dir", "seed"], "input_path, output_dir, seed come first"
    assert values["input_path"] is None
    assert values["output_dir"] == f"results/{source.stem}"
    assert values["seed"] == 0


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_story_and_no_analysis_code(source):
    text = source.read_text(encoding="utf-8")
    nb = jupytext.read(source)
    first_markdown = next(c for c in nb.cells if c.cell_type == "markdown").source
    assert first_markdown.startswith("# "), "a notebook opens with an H1 title"
    assert "Goals" in first_markdown and "1. " in first_markdown, "numbered goals come first"
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Prerequisites" and "## Summary" in headings and headings[-1] == "## References"
    assert "Time to run" in text
    for cell in _code_cells(nb):
        tree = ast.parse(cell.source)
        defined = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert not defined, f"{source.stem} defines {defined}: analysis code belongs in stemml_core"
        assert "filterwarnings" not in cell.source and "simplefilter" not in cell.source, "no warning filters"
        assert "urlopen" not in cell.source and "requests." not in cell.source, "no network"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_no_dollar_math(source):
    """The book is read offline and Sphinx loads MathJax from a CDN on any page with math: formulas are
    written in Unicode text (σ, ∇·E, ⟨k⟩) instead."""
    nb = jupytext.read(source)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            assert "$" not in cell.source, f"{source.stem}: '$' math in a markdown cell needs MathJax from a CDN"
