"""Publish a protected dataset folder (the output of ``uexamples protect`` / ``hub_scripts/protect.py``).

The dataset goes first (``Dataset.push_to_hub``), then the card and the preview in one commit: the
card keeps the ``dataset_info``/``configs`` metadata that ``push_to_hub`` wrote and adds ours. The
token comes from the usual Hugging Face sources (``HF_TOKEN``, ``hf auth login``) and is never
printed; errors name the problem and say that the local output is kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import errors as hf_errors

from .cards import render_card, source_license


# Transport errors as huggingface_hub exports them, whatever HTTP library it uses underneath (httpx2 in
# huggingface_hub 2, requests before: errors.HTTPError is then absent and requests' errors are OSErrors).
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = tuple(
    e for e in (getattr(hf_errors, "HTTPError", None), hf_errors.HfHubHTTPError) if isinstance(e, type)
)


class PublishError(RuntimeError):
    """The Hub refused or dropped the upload; the local output is untouched and a rerun retries."""


def _explain(exc: BaseException, repo_id: str, out_dir: Path | None) -> PublishError:
    keep = f" The local output is kept in {out_dir}; run the same command again to finish the push." if out_dir else ""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 401 or status == 403:
        why = f"the Hub refused the credentials ({status}): set HF_TOKEN or run `hf auth login` with a write token for {repo_id!r}"
    elif status == 404:
        why = f"the Hub answered 404 for {repo_id!r}: check the repository id and that the token may write to its namespace"
    elif status is not None and status >= 500:
        why = f"the Hub answered {status} (a server error) while publishing {repo_id!r}"
    elif status is not None:
        why = f"the Hub answered {status} while publishing {repo_id!r}"
    else:
        why = f"the connection to the Hub failed while publishing {repo_id!r} ({type(exc).__name__})"
    return PublishError(f"{why}.{keep}")


def publish(protected: Any, repo_id: str, private: bool = False, evaluation: Any = None, token: str | None = None, *,
            protector: Any = None, source: Any = None, split: str = "train", dataset_name: str | None = None) -> str:  # fmt: skip
    """Push a protected split to the dataset repo ``repo_id`` with its card and preview; returns the repo URL.

    ``protected``: the folder of a ``uexamples protect`` output (its ``summary.json`` makes the card), or a
    ``datasets.Dataset`` protected in Python; then pass the fitted ``protector`` and the clean ``source``
    split it protected (the card's quality numbers and preview are measured from them), the ``split`` name
    and ``dataset_name`` (the source's Hub id, for the card). ``evaluation``: an ``evaluate`` report or
    its output folder, put into the card.

    >>> import uexamples as ue                                            # doctest: +SKIP
    >>> ds = ue.load_sample_dataset(); sem = ue.SEMProtect(seed=0).fit(ds)   # doctest: +SKIP
    >>> ue.publish(ds.map(sem, batched=True), "me/cifar-protected", protector=sem, source=ds)   # doctest: +SKIP
    """
    import datasets
    import tempfile

    if isinstance(protected, (str, Path)):
        out_dir = Path(protected)
        summary_path = out_dir / "summary.json"
        if not summary_path.is_file():
            raise PublishError(f"{out_dir} is not a finished uexamples output (no summary.json)")
        summary = json.loads(summary_path.read_text())
        if summary.get("streaming"):  # parquet shards in the Hub's layout already: uploaded as they are
            ds: Any = ParquetFolder(out_dir / "dataset", summary)
        else:
            ds = datasets.load_from_disk(str(out_dir / "dataset"))
        return _push(ds, summary, repo_id, out_dir / "preview.png", evaluation, private, token, out_dir)
    if not isinstance(protected, datasets.Dataset):
        raise TypeError(f"publish takes a protected datasets.Dataset or an output folder, got {type(protected).__name__}")
    if protector is None or source is None:
        raise TypeError("publish(dataset, ...) needs protector= (the fitted protector) and source= (the clean split it "
                        "protected): the card is made from them")  # fmt: skip
    if len(source) != len(protected):
        raise ValueError(f"source has {len(source)} rows and the protected split {len(protected)}: pass the split it protected")
    from .cards import protection_summary

    with tempfile.TemporaryDirectory() as tmp:
        summary = protection_summary(source, protected, protector, dataset_name, split, preview=Path(tmp) / "preview.png")
        return _push(protected, summary, repo_id, Path(tmp) / "preview.png", evaluation, private, token, None)


class ParquetFolder:
    """A ``--streaming`` output's ``dataset/``: parquet shards under ``data/``, pushed without loading them (or
    already on the Hub, uploaded one by one while they were written: :class:`ShardUploader`)."""

    def __init__(self, folder: Path, summary: dict[str, Any]) -> None:
        self.folder, self.summary = Path(folder), summary
        self.split = summary.get("split") or "train"
        self.uploaded = bool(summary.get("shards_uploaded"))
        self.shards = sorted((self.folder / "data").glob(f"{self.split}-*.parquet"))
        if not self.shards and not self.uploaded:
            raise PublishError(f"{self.folder / 'data'} holds no {self.split}-*.parquet shard")

    def push_to_hub(self, repo_id: str, private: bool, token: str | None) -> dict[str, Any]:
        """Upload the shards (unless they are there already); return the card metadata that
        ``Dataset.push_to_hub`` would have written."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if not self.uploaded:
            api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(self.folder),
                              allow_patterns=["data/*.parquet"], commit_message="uexamples: protected parquet shards")  # fmt: skip
        return {
            "dataset_info": {"features": self.summary["features"],
                             "splits": [{"name": self.split, "num_examples": self.summary["images"]}]},  # fmt: skip
            "configs": [{"config_name": "default", "data_files": [{"split": self.split, "path": f"data/{self.split}-*"}]}],
        }


class ShardUploader:
    """``on_shard`` for :func:`uexamples.streaming.protect_stream`: upload each finished shard to the dataset repo
    and delete it, so that a dataset larger than the disk goes through one shard at a time."""

    def __init__(self, repo_id: str, private: bool = False, token: str | None = None) -> None:
        from huggingface_hub import HfApi

        self.repo_id, self.api = repo_id, HfApi(token=token)
        try:
            self.api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        except (*_TRANSPORT_ERRORS, OSError) as exc:
            raise _explain(exc, repo_id, None) from None

    def __call__(self, path: Path) -> None:
        try:
            self.api.upload_file(path_or_fileobj=str(path), path_in_repo=f"data/{path.name}", repo_id=self.repo_id,
                                 repo_type="dataset", commit_message=f"uexamples: shard {path.name}")  # fmt: skip
        except (*_TRANSPORT_ERRORS, OSError, RuntimeError) as exc:
            raise _explain(exc, self.repo_id, None) from None
        path.unlink()


def _evaluation_files(evaluation: Any, tmp: Path) -> tuple[str | None, Path | None]:
    """(table markdown, curves picture) of an evaluation: a report object or its output folder."""
    if evaluation is None:
        return None, None
    if not isinstance(evaluation, (str, Path)):  # an EvaluationReport / RetrievalReport
        evaluation = evaluation.save(tmp / "evaluation")
    table_path = Path(evaluation) / "table.md"
    if not table_path.is_file():
        raise PublishError(f"{evaluation} holds no table.md: pass the output folder of `uexamples evaluate`")
    curves = Path(evaluation) / "curves.png"
    return table_path.read_text().strip(), curves if curves.is_file() else None


def _push(ds: Any, summary: dict, repo_id: str, preview: Path, evaluation: Any, private: bool, token: str | None,
          out_dir: Path | None) -> str:  # fmt: skip
    import tempfile

    import datasets
    from huggingface_hub import CommitOperationAdd, DatasetCard, HfApi

    split = summary.get("split") or "train"
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        table, curves = _evaluation_files(evaluation, Path(tmp))
        try:
            if isinstance(ds, ParquetFolder):
                written = ds.push_to_hub(repo_id, private=private, token=token)
            else:
                if isinstance(ds, datasets.DatasetDict):  # a --splits output: every split in the one repository
                    ds.push_to_hub(repo_id, private=private, token=token)
                else:
                    ds.push_to_hub(repo_id, split=split, private=private, token=token)
                written = DatasetCard.load(repo_id, repo_type="dataset", token=token).data.to_dict()
            card = DatasetCard(render_card(summary, repo_id, source_license((summary.get("source") or {}).get("dataset")),
                                           evaluation=table))  # fmt: skip
            for key in ("dataset_info", "configs"):
                value = written.get(key)
                if value is not None:
                    card.data[key] = value
            ops = [CommitOperationAdd("README.md", str(card).encode()), CommitOperationAdd("preview.png", str(preview))]
            if curves is not None:
                ops.append(CommitOperationAdd("evaluation.png", str(curves)))
            api.create_commit(repo_id, ops, repo_type="dataset", commit_message="uexamples: dataset card and preview")
        except (*_TRANSPORT_ERRORS, OSError, RuntimeError) as exc:  # HfHubHTTPError is an OSError; LFS failures a RuntimeError
            raise _explain(exc, repo_id, out_dir) from None
    return f"{api.endpoint}/datasets/{repo_id}"


# ---------------------------------------------------------------------------------------- protectors on the Hub
class ProtectorNotFound(FileNotFoundError):
    """A protector could not be found as a folder or a Hub model repository."""


def download_protector(repo_id: str, revision: str | None = None, token: str | bool | None = None,
                       cache_dir: str | Path | None = None, local_files_only: bool = False) -> Path:  # fmt: skip
    """The local folder of a protector on the Hub (model repo ``repo_id``): its config and weights, downloaded
    into (or, offline, read from) huggingface_hub's cache. ``HF_HUB_OFFLINE=1`` works as for transformers."""
    from huggingface_hub import constants, hf_hub_download

    from .core.protector import CONFIG_NAME, WEIGHTS_NAME

    offline = bool(local_files_only or constants.HF_HUB_OFFLINE)
    try:
        paths = [hf_hub_download(repo_id, name, revision=revision, token=token, cache_dir=cache_dir,
                                 local_files_only=offline) for name in (CONFIG_NAME, WEIGHTS_NAME)]  # fmt: skip
    except hf_errors.RepositoryNotFoundError:
        raise ProtectorNotFound(f"{repo_id!r} is neither a folder nor a model repository on the Hub that this token "
                                "can read") from None  # fmt: skip
    except hf_errors.RevisionNotFoundError:
        raise ProtectorNotFound(f"the Hub repository {repo_id!r} has no revision {revision!r}") from None
    except hf_errors.EntryNotFoundError:
        raise ProtectorNotFound(f"the Hub repository {repo_id!r} holds no uexamples protector ({CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}): was it pushed with protector.push_to_hub?") from None  # fmt: skip
    except hf_errors.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "local_files_only=True" if local_files_only else "the Hub cannot be reached"
        raise ProtectorNotFound(f"protector {repo_id!r} is not in the local cache and {why}") from None
    except (*_TRANSPORT_ERRORS, OSError) as exc:
        raise ProtectorNotFound(f"protector {repo_id!r} could not be downloaded ({type(exc).__name__}: {exc})") from None
    return Path(paths[0]).parent


def protector_card(protector: Any, repo_id: str) -> str:
    """A model card for a fitted protector: what it does, the paper, the config (no secret), what it was fitted on."""
    from huggingface_hub import ModelCard, ModelCardData

    config = protector.public_config()
    fitted = protector.fitted_on or {}
    data = ModelCardData(library_name="uexamples", tags=["uexamples", "unlearnable-examples", protector.method])
    lines = [
        f"# {repo_id.split('/')[-1]}: a fitted {protector.title or protector.method} protector",
        "",
        f"A [uexamples](https://github.com/uexamples/uexamples) protector: `{protector.method}`, fitted, ready to protect "
        "images so that models trained on them learn a shortcut instead of the content.",
        "",
        f"- Method: {protector.title or protector.method}. {protector.summary}",
        *([f"- Paper: {protector.paper}"] if protector.paper else []),
        f"- Fitted on: {fitted.get('dataset') or 'a dataset not named by its owner'}"
        + (f" ({fitted['rows']} rows)" if fitted.get("rows") else ""),
        *(f"- {name}: {decision}" for name, decision in protector.rules.items()),
        *([f"- {note}" for note in protector.card_notes(config)]),
        "",
        "## Use",
        "",
        "```python",
        "import uexamples as ue",
        "",
        f'protector = ue.Protector.from_pretrained("{repo_id}"'
        + (", key=...)  # the private key is never published" if protector.secret_names() else ")"),
        "protected = dataset.map(protector, batched=True)",
        "```",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(config, indent=2, sort_keys=True, default=str),
        "```",
    ]
    if protector.citation:
        lines += ["", "## Citation", "", "```bibtex", protector.citation, "```"]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def push_protector(protector: Any, repo_id: str, private: bool = False, token: str | None = None,
                   commit_message: str | None = None, revision: str | None = None) -> str:  # fmt: skip
    """Save ``protector`` and upload it with its model card to the model repo ``repo_id`` (created if needed)."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = protector.save_pretrained(Path(tmp) / "protector")
        (folder / "README.md").write_text(protector_card(protector, repo_id))
        try:
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                     commit_message=commit_message or f"uexamples: fitted {protector.method} protector")  # fmt: skip
        except (*_TRANSPORT_ERRORS, OSError, RuntimeError) as exc:
            raise _explain(exc, repo_id, None) from None
    return str(getattr(info, "commit_url", None) or f"{api.endpoint}/{repo_id}")
