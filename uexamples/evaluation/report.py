"""What every evaluation report writes: JSON, a plot and a Markdown table (shared by the classifier and
retrieval reports, which define ``to_dict``, ``plot`` and ``to_markdown``)."""

from __future__ import annotations

import json
from pathlib import Path


class ReportFiles:
    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, default=str)  # type: ignore[attr-defined]
        if path is not None:
            Path(path).write_text(text)
        return text

    def save(self, folder: str | Path) -> Path:
        """Write report.json, curves.png and table.md into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.to_json(folder / "report.json")
        self.plot(folder / "curves.png")  # type: ignore[attr-defined]
        (folder / "table.md").write_text(self.to_markdown() + "\n")  # type: ignore[attr-defined]
        return folder
