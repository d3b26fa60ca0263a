"""The `uexamples protect` command end to end, and its errors."""

import json
import subprocess
import sys

import datasets
import numpy as np
import pytest

from uexamples.cli import main


pytestmark = pytest.mark.integration


def test_protect_cuda_on_embedded_sample(tmp_path, capsys, monkeypatch):
    key = "918273645546372819"
    monkeypatch.setenv("UEXAMPLES_CUDA_KEY", key)
    out = tmp_path / "out"
    assert main(["protect", "--method", "cuda", "--output", str(out), "--quiet"]) == 0
    printed = capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 500 and summary["method"] == "cuda"
    assert summary["mean_psnr"] > 5 and 0 < summary["mean_ssim"] < 1
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert len(ds) == 500 and ds[0]["image"].size == (32, 32)
    assert (out / "preview.png").read_bytes()[:4] == b"\x89PNG"
    for f in [*out.rglob("*")]:
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f
    assert key not in printed.out + printed.err


def test_protect_sem_on_a_grayscale_dataset_repo(tmp_path, grey_sample_repo):
    src = datasets.load_dataset(str(grey_sample_repo), split="train")
    out = tmp_path / "bm"
    cmd = [sys.executable, "-m", "uexamples.cli", "protect", "--dataset", str(grey_sample_repo),
           "--method", "sem", "--train-steps", "4", "--epsilon", "8/255", "--output", str(out), "--verbose"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    assert "[uexamples] INFO: SEM fitted on 120 images" in res.stderr  # --verbose: uexamples' INFO log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 120 and summary["linf_levels"] <= 8
    # train_steps given: no fit-length rule; the resolution rule decided and is in the summary and the card
    assert set(summary["rules"]) == {"resolution", "clean_target", "decoy_class"}  # SEM's preset: a decoy class (2026-12-08)
    assert summary["rules"]["resolution"] == "native 32x32 (every fit image is 32x32, at most native_up_to=32 px; larger images: the 32 px grid)"
    from uexamples.cards import render_card

    card = render_card(summary, "someone/grey", license="mit")
    assert "preset's rule, resolution: native 32x32" in card and "preset's rule, decoy class: the images of class index" in card
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert ds[0]["image"].mode == "L"
    diff = np.abs(np.asarray(ds[0]["image"], int) - np.asarray(src[0]["image"], int))
    assert 0 < diff.max() <= 8


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "nope"], "unknown method"),
        (["--method", "sem", "--epsilon", "0"], "epsilon"),
        (["--method", "sem", "--epsilon", "2"], "epsilon"),
        (["--method", "cuda"], "key"),
        (["--method", "cuda", "--key", "abc"], "integer"),
        (["--method", "sem", "--dataset", "/nonexistent/dataset"], "not found"),
    ],
)
def test_cli_errors(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("UEXAMPLES_CUDA_KEY", raising=False)
    code = main(["protect", *argv, "--output", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert not (tmp_path / "o").exists(), "no partial output"
    assert "abc" not in err  # a bad key is never echoed


def test_epsilon_as_a_fraction(capsys):
    """--epsilon 8/255 as evaluate reads adv:8/255 (the grey CLI test above protects with it end to end);
    a bad fraction is argparse's usage error naming the option."""
    from uexamples.cli import build_parser

    assert build_parser("sem").parse_args(["protect", "--method", "sem", "--output", "o", "--epsilon", "8/255"]).epsilon == 8 / 255
    with pytest.raises(SystemExit) as exc:
        build_parser("sem").parse_args(["protect", "--method", "sem", "--output", "o", "--epsilon", "8/0"])
    assert exc.value.code == 2 and "--epsilon" in capsys.readouterr().err


def test_cli_errors_speak_in_options(tmp_path, capsys):
    """The library says `label_column=`; the command line says `--label-column`."""
    import uexamples as ue

    ue.load_sample_dataset().select(range(8)).remove_columns("label").save_to_disk(str(tmp_path / "nolabels"))
    code = main(["protect", "--dataset", str(tmp_path / "nolabels"), "--method", "sem", "--output", str(tmp_path / "o"),
                 "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--label-column" in err and "label_column=" not in err
