"""Protect a stream into sharded parquet, with bounded memory (``uexamples protect --streaming``).

For datasets larger than memory (or than the disk, when each finished shard is uploaded and deleted):
rows are read from an ``IterableDataset`` a batch at a time, protected, and appended to parquet shards
laid out as the Hub lays out a dataset (``data/{split}-00000-of-00003.parquet``), so that
``datasets.load_dataset(folder)`` and the Hub read the result as they read any dataset. In memory at
any time: one batch of rows, one parquet row group, the first few images for the preview.

The quality summary is measured on the fly (L-inf over every image, the means over the first 2,000).

>>> import tempfile, datasets, uexamples as ue
>>> stream = ue.load_sample_dataset().select(range(40)).to_iterable_dataset()
>>> protector = ue.CUDAProtect(key=2**62 + 20231101, num_classes=10)
>>> folder = tempfile.mkdtemp()
>>> report = protect_stream(protector, stream, folder, split="train", progress=False)
>>> report["images"], [p.name for p in report["shards"]]
(40, ['train-00000-of-00001.parquet'])
>>> len(datasets.load_dataset(folder, split="train"))
40
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from .core.progress import progress_bar
from .evaluation.metrics import QualityMeter

DEFAULT_MAX_SHARD_BYTES = 500 * 2**20  # datasets' own default shard size for push_to_hub
PREVIEW_ROWS = 6


class ParquetShards:
    """Batches of rows in, parquet shards out under ``folder/data/``.

    A shard is written under a temporary name and renamed ``{split}-{index:05d}.parquet`` when it is
    complete (at ``max_shard_bytes`` of encoded rows); :meth:`close` renames them all to the Hub's
    ``-of-{count:05d}`` names, which only then are known. ``on_shard(path)`` is called for each completed
    shard: the hub script uploads it there and deletes it, so that the disk holds one shard at a time
    (such a shard keeps its interim name, which the card's ``data/{split}-*`` pattern matches).
    """

    def __init__(self, folder: str | os.PathLike, split: str, features: datasets.Features,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, on_shard: Callable[[Path], None] | None = None) -> None:  # fmt: skip
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
        self.folder = Path(folder) / "data"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.split, self.features, self.max_shard_bytes, self.on_shard = split, features, max_shard_bytes, on_shard
        self.schema = features.arrow_schema  # carries the features (Image, ClassLabel) as metadata
        self.done: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._bytes = 0

    def _tmp(self) -> Path:
        return self.folder / f".{self.split}-{len(self.done):05d}.parquet.partial"

    def write(self, batch: dict[str, list]) -> None:
        table = pa.Table.from_pydict(self.features.encode_batch(batch), schema=self.schema)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp(), self.schema)
        self._writer.write_table(table)  # one row group per batch: memory stays at one batch
        self._bytes += table.nbytes
        if self._bytes >= self.max_shard_bytes:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        path = self.folder / f"{self.split}-{len(self.done):05d}.parquet"
        self._tmp().rename(path)
        self.done.append(path)
        self._writer, self._bytes = None, 0
        if self.on_shard is not None:
            self.on_shard(path)

    def close(self) -> list[Path]:
        """Finish the last shard; rename every shard to its final ``-of-N`` name; return the paths in order."""
        self._finish_shard()
        if not self.done:  # an empty stream still gives a readable (empty) split
            pq.write_table(self.schema.empty_table(), self._tmp())
            self._tmp().rename(self.folder / f"{self.split}-00000.parquet")
            self.done.append(self.folder / f"{self.split}-00000.parquet")
        final = []
        for i, path in enumerate(self.done):
            if not path.exists():  # uploaded and deleted by on_shard
                final.append(path)
                continue
            target = path.with_name(f"{self.split}-{i:05d}-of-{len(self.done):05d}.parquet")
            path.rename(target)
            final.append(target)
        self.done = final
        return final

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._tmp().unlink(missing_ok=True)
            self._writer = None


def protect_stream(protector: Any, stream: datasets.IterableDataset, folder: str | os.PathLike, split: str = "train",
                   batch_size: int = 64, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
                   total: int | None = None, on_shard: Callable[[Path], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Protect every row of ``stream`` with a fitted ``protector`` into parquet shards under ``folder/data/``.

    Rows keep their order and every column; the images are stored as the protector stores them (PNG,
    or TIFF for CMYK), with the same bytes as ``protector.apply`` gives for the same rows. Returns
    ``images``, ``shards`` (paths), ``quality`` (as ``dataset_quality``), ``formats``, ``preview`` (the
    first rows' original and protected cells, for ``preview.save_preview_cells``) and ``features``.
    """
    from .cards import cell_format

    protector.require_fitted("it protects images")
    if stream.features is None:
        raise ValueError("this stream has no features (datasets could not infer them): protect_stream needs the "
                         "image column's Image feature; cast it first (stream.cast_column('image', datasets.Image()))")  # fmt: skip
    image = protector.columns_for(stream.features).image
    if total is None:  # the row count, where the dataset's metadata knows it (for the progress bar)
        splits = getattr(stream.info, "splits", None) or {}
        total = getattr(splits.get(split), "num_examples", None) or None
    raw = stream.cast_column(image, datasets.Image(decode=False))  # bytes in, bytes out: no decode/encode round trip
    writer = ParquetShards(folder, split, stream.features, max_shard_bytes, on_shard)  # the decoding Image feature
    meter, formats, preview = QualityMeter(), set(), []
    bar = progress_bar(total=total, desc=f"Protecting ({protector.method}, streaming)", unit="img", progress=progress)
    row = 0
    try:
        for batch in raw.iter(batch_size=batch_size):
            n = len(batch[image])
            out = protector(batch, indices=range(row, row + n))
            for i, (original, protected) in enumerate(zip(batch[image], out[image])):
                meter.add(original, protected, row=row + i)
                formats.add(cell_format(protected))
                if len(preview) < PREVIEW_ROWS:
                    preview.append((original, protected))
            writer.write(out)
            row += n
            bar.update(n)
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return {"images": row, "shards": shards, "quality": meter.result(), "formats": sorted(formats), "preview": preview,
            "features": stream.features}  # fmt: skip
