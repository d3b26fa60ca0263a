"""The benchmark tables in benchmarks/README.md come from the committed results files, not from hand edits."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield {name: importlib.import_module(name) for name in ("common", "generalisation", "image_text")}
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_splice_table_replaces_only_the_marked_block(bench, tmp_path):
    common = bench["common"]
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- table:x -->\nold\nrows\n<!-- /table:x -->\nb\n<!-- table:y -->\nkeep\n<!-- /table:y -->\n")
    common.splice_table(readme, "x", "| new |\n")
    assert readme.read_text() == "a\n<!-- table:x -->\n| new |\n<!-- /table:x -->\nb\n<!-- table:y -->\nkeep\n<!-- /table:y -->\n"


@pytest.mark.parametrize("text", ["no markers\n", "<!-- /table:x -->\n<!-- table:x -->\n",
                                  "<!-- table:x -->\n<!-- /table:x -->\n<!-- table:x -->\n<!-- /table:x -->\n"])
def test_splice_table_refuses_missing_reversed_or_doubled_markers(bench, tmp_path, text):
    common = bench["common"]
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(SystemExit, match="table:x"):
        common.splice_table(readme, "x", "| new |\n")
    assert readme.read_text() == text  # nothing written


@pytest.mark.parametrize("script", ["generalisation", "image_text"])
def test_generated_tables_in_readme_are_the_results_files(bench, script):
    """A results file committed without `SCRIPT.py --update-readme` (or a table edited by hand) fails here."""
    text = bench["common"].README.read_text(encoding="utf-8")
    block = text.split(f"<!-- table:{script} -->\n")[1].split(f"<!-- /table:{script} -->\n")[0]
    assert block == bench[script].table().rstrip("\n") + "\n"


def test_generalisation_victim_columns_have_a_fixed_order(bench):
    headers = [line for line in bench["generalisation"].table().splitlines() if line.startswith("| dataset")]
    assert len(headers) == 2  # tune and confirm
    for header in headers:
        victims = header.split(" | ")[5:-2]
        assert victims[:2] == ["convnet", "resnet20"]
        assert len(victims) > 2 and victims[2:] == sorted(victims[2:])

