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


def test_confirm_figure_scores_each_fit_of_the_presets_against_the_issue_target(bench, tmp_path, monkeypatch):
    """The confirm figure's points: fraction of clean on 10 classes, share of the margin above chance on fewer;
    only today's preset rows (any fit seed), confirm cells only, and a later file's re-run replaces a row."""
    import json

    gen = bench["generalisation"]
    monkeypatch.setattr(gen, "RESULTS", tmp_path)

    def entry(suite, clean, methods):
        return {"suite": suite, "size": 32, "mode": "RGB", "train_images": 100, "clean": {"convnet": {"final": clean}},
                "methods": {m: {"victims": {"convnet": {"final": f}}} for m, f in methods.items()}}  # fmt: skip

    (tmp_path / "generalisation_a.json").write_text(json.dumps({"variants": {
        "x@n100": entry("confirm", 0.8, {"sem": 0.2, "sem+seed=1": 0.4, "sem+clean_uniform_weight=0": 0.1, "cuda": 0.3}),
        "x@c5@n100": entry("confirm", 0.7, {"em": 0.25}),
        "x@n200": entry("tune", 0.8, {"sem": 0.1})}}))  # fmt: skip
    (tmp_path / "generalisation_b.json").write_text(json.dumps({"variants": {"x@n100": entry("confirm", 0.8, {"cuda": 0.4})}}))
    points, cells = gen.confirm_points()
    assert sorted(cells) == ["x@c5@n100", "x@n100"]  # the confirm cells only, for the figure's labels
    assert sorted(points) == [("x@c5@n100", "em", "convnet"), ("x@n100", "cuda", "convnet"), ("x@n100", "sem", "convnet")]
    assert sorted(points[("x@n100", "sem", "convnet")]) == pytest.approx([0.25, 0.5])  # two fits; the non-preset row left out
    assert points[("x@n100", "cuda", "convnet")] == pytest.approx([0.5])  # file b's re-run replaced file a's 0.3 / 0.8
    assert points[("x@c5@n100", "em", "convnet")] == pytest.approx([(0.25 - 0.2) / (0.7 - 0.2)])  # 5 classes: margin share
