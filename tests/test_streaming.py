"""Streaming: `uexamples protect --streaming` writes sharded parquet, batch by batch, equal to the non-streamed run."""

import json

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import random_image

import uexamples as ue
from uexamples.cli import _load_protected, main
from uexamples.streaming import protect_stream

pytestmark = pytest.mark.integration


def image_bytes(ds: datasets.Dataset) -> list[bytes]:
    return [c["bytes"] for c in ds.cast_column("image", datasets.Image(decode=False))["image"]]


@pytest.mark.parametrize("method", ["cuda", "sem"])
def test_streamed_cli_run_equals_the_non_streamed_one(tmp_path, grey_sample_repo, monkeypatch, method):
    monkeypatch.setenv("UEXAMPLES_CUDA_KEY", str(2**61 + 99))
    args = ["--dataset", str(grey_sample_repo), "--quiet"]
    if method == "sem":  # a fitted protector: the streamed fit sees a shuffled sample, so give both runs the same fit
        src = datasets.load_dataset(str(grey_sample_repo), split="train")
        ue.SEMProtect(seed=0, train_steps=2).fit(src, progress=False).save_pretrained(tmp_path / "sem")
        args += ["--protector", str(tmp_path / "sem")]
    else:
        args += ["--method", "cuda"]
    assert main(["protect", *args, "--output", str(tmp_path / "plain")]) == 0
    # a tiny shard size: several shards, as a dataset larger than memory would have
    assert main(["protect", *args, "--streaming", "--max-shard-size", "20KB", "--output", str(tmp_path / "streamed")]) == 0

    plain = datasets.load_from_disk(str(tmp_path / "plain" / "dataset"))
    shards = sorted((tmp_path / "streamed" / "dataset" / "data").glob("*.parquet"))
    assert len(shards) > 1 and all(p.name.endswith(f"-of-{len(shards):05d}.parquet") for p in shards)
    streamed = datasets.load_dataset(str(tmp_path / "streamed" / "dataset"), split="train")
    assert streamed.features == plain.features  # Image (decoding) and ClassLabel kept
    assert image_bytes(streamed) == image_bytes(plain)  # the same stored bytes, row for row, in order
    assert streamed["label"] == plain["label"]
    assert streamed[0]["image"].mode == "L"

    s_plain = json.loads((tmp_path / "plain" / "summary.json").read_text())
    s_stream = json.loads((tmp_path / "streamed" / "summary.json").read_text())
    for key in ("images", "linf_levels", "mean_psnr", "mean_ssim", "formats", "config"):
        assert s_stream[key] == s_plain[key], key
    assert s_stream["streaming"] is True and s_stream["shards"] == [p.name for p in shards]
    assert (tmp_path / "streamed" / "preview.png").read_bytes()[:4] == b"\x89PNG"
    loaded, summary = _load_protected(str(tmp_path / "streamed"), "train")  # what `uexamples evaluate` reads
    assert len(loaded) == len(plain) and summary["streaming"]


def test_a_stream_is_written_while_it_is_read(tmp_path):
    """Memory stays bounded: shards are complete long before the stream ends, one row group per batch."""
    rows_read = {"n": 0}
    seen_at_shard: list[int] = []

    def rows():
        for i in range(200):
            rows_read["n"] += 1
            yield {"image": random_image("RGB", (24, 24), seed=i), "label": i % 3}

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    stream = datasets.IterableDataset.from_generator(rows, features=features)
    protector = ue.CUDAProtect(key=2**61 + 5, num_classes=3)
    report = protect_stream(protector, stream, tmp_path, split="train", batch_size=16, max_shard_bytes=30_000,
                            progress=False, on_shard=lambda path: seen_at_shard.append(rows_read["n"]))
    assert report["images"] == 200 and len(report["shards"]) == len(seen_at_shard) > 2
    assert seen_at_shard[0] < 100  # the first shard was finished after reading a fraction of the stream
    assert all(pq.ParquetFile(p).metadata.num_rows <= 16 * pq.ParquetFile(p).num_row_groups for p in report["shards"])
    out = datasets.load_dataset(str(tmp_path), split="train")
    assert out["label"] == [i % 3 for i in range(200)]
    # the rows equal what apply gives on the same rows held in memory
    in_memory = datasets.Dataset.from_generator(rows, features=features)
    assert image_bytes(out) == image_bytes(protector.apply(in_memory))
    q = report["quality"]
    assert q["quality_images"] == 200 and q["linf_levels"] > 0 and np.isfinite(q["mean_psnr"])


def test_streaming_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UEXAMPLES_CUDA_KEY", str(2**61 + 99))
    assert main(["protect", "--method", "cuda", "--streaming", "--max-shard-size", "lots", "--output", str(tmp_path / "a")]) == 2
    assert "--max-shard-size 'lots'" in capsys.readouterr().err
    assert main(["protect", "--method", "cuda", "--streaming", "--splits", "train,test", "--output", str(tmp_path / "b")]) == 2
    assert "one split" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
