"""Publish a protected dataset folder (the output of ``uexamples protect`` / ``hub_scripts/protect.py``).

The dataset goes first (``Dataset.push_to_hub``), then the card and the preview in one commit: the
card keeps the ``dataset_info``/``configs`` metadata that ``push_to_hub`` wrote and adds ours. The
token comes from the usual Hugging Face sources (``HF_TOKEN``, ``hf auth login``) and is never
printed; errors name the problem and say that the local output is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import errors as hf_errors

from .cards import render_card, source_license


# Transport errors as huggingface_hub exports them, whatever HTTP library it uses underneath (httpx2 in
# huggingface_hub 2, requests before: errors.HTTPError is then absent and requests' errors are OSErrors).
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = tuple(
    e for e in (getattr(hf_errors, "HTTPError", None), hf_errors.HfHubHTTPError) if isinstance(e, type)
)


class PublishError(RuntimeError):
    """The Hub refused or dropped the upload; the local output is untouched and a rerun retries."""


def _explain(exc: BaseException, repo_id: str, out_dir: Path) -> PublishError:
    keep = f"The local output is kept in {out_dir}; run the same command again to finish the push."
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
    return PublishError(f"{why}. {keep}")


def publish(out_dir: str | Path, repo_id: str, private: bool = False, evaluation: str | Path | None = None,
            token: str | None = None) -> str:  # fmt: skip
    """Push ``out_dir/dataset`` to the dataset repo ``repo_id``, then its card and preview; returns the repo URL."""
    import datasets
    from huggingface_hub import CommitOperationAdd, DatasetCard, HfApi

    out_dir = Path(out_dir)
    summary_path = out_dir / "summary.json"
    if not summary_path.is_file():
        raise PublishError(f"{out_dir} is not a finished uexamples output (no summary.json)")
    summary = json.loads(summary_path.read_text())
    split = summary.get("split") or "train"
    table = None
    if evaluation is not None:
        table_path = Path(evaluation) / "table.md"
        if not table_path.is_file():
            raise PublishError(f"{evaluation} holds no table.md: pass the output folder of `uexamples evaluate`")
        table = table_path.read_text().strip()
    ds = datasets.load_from_disk(str(out_dir / "dataset"))
    api = HfApi(token=token)
    try:
        ds.push_to_hub(repo_id, split=split, private=private, token=token)
        pushed = DatasetCard.load(repo_id, repo_type="dataset", token=token)
        card = DatasetCard(render_card(summary, repo_id, source_license((summary.get("source") or {}).get("dataset")),
                                       evaluation=table))  # fmt: skip
        for key in ("dataset_info", "configs"):
            value = pushed.data.to_dict().get(key)
            if value is not None:
                card.data[key] = value
        ops = [
            CommitOperationAdd("README.md", str(card).encode()),
            CommitOperationAdd("preview.png", str(out_dir / "preview.png")),
        ]
        if evaluation is not None and (Path(evaluation) / "curves.png").is_file():
            ops.append(CommitOperationAdd("evaluation.png", str(Path(evaluation) / "curves.png")))
        api.create_commit(repo_id, ops, repo_type="dataset", commit_message="uexamples: dataset card and preview")
    except (*_TRANSPORT_ERRORS, OSError, RuntimeError) as exc:  # HfHubHTTPError is an OSError; LFS failures a RuntimeError
        raise _explain(exc, repo_id, out_dir) from None
    return f"{api.endpoint}/datasets/{repo_id}"
