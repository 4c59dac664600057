"""Where the fedxvit checkout is: the one anchor for the default data, models and MLflow store.

NVFlare's simulator and POC workers run from workspace folders that may lie outside the
checkout, so the cwd alone is not enough; an editable install still knows where it lives.
"""

from __future__ import annotations

import os
from pathlib import Path


def _is_checkout(folder: Path) -> bool:
    return (folder / "pyproject.toml").is_file() and (folder / "custom" / "fedxvit").is_dir()


def project_root(start: os.PathLike | None = None) -> Path:
    """The nearest checkout from `start` (default: cwd) upward, else the one fedxvit is installed from, else `start`."""
    start = Path(start or os.getcwd()).resolve()
    for folder in (start, *start.parents):
        if _is_checkout(folder):
            return folder
    installed = Path(__file__).resolve().parents[2]
    return installed if _is_checkout(installed) else start
