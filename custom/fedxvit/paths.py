"""Where the fedxvit checkout is: the one anchor for the default data, models and MLflow store.

NVFlare's simulator and POC workers run from workspace folders that may lie outside the
checkout, so the cwd alone is not enough; an editable install still knows where it lives.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedxvit.errors import FedXViTError


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


ALLOWED_ROOTS_ENV = "FEDXVIT_ALLOWED_ROOTS"


def allowed_roots(environ: dict | None = None) -> list[Path]:
    """The folders a site lets its datalists and job paths point into besides their own folder: $FEDXVIT_ALLOWED_ROOTS,
    os.pathsep-separated (a shared image store, say). The site sets it in its own environment; a job cannot."""
    environ = os.environ if environ is None else environ
    return [
        Path(os.path.realpath(Path(p).expanduser())) for p in environ.get(ALLOWED_ROOTS_ENV, "").split(os.pathsep) if p
    ]


def resolve_inside(entry: os.PathLike | str, base: os.PathLike, environ: dict | None = None) -> Path | None:
    """The real path of `entry` (taken from `base` when relative, every `..` and symlink followed) when it lies inside
    `base` or a root the site allows; None when it escapes them."""
    real = Path(os.path.realpath(Path(base) / entry))
    for root in (Path(os.path.realpath(base)), *allowed_roots(environ)):
        if real == root or root in real.parents:
            return real
    return None


def job_path(option: str, value: str, base: os.PathLike | None = None, environ: dict | None = None) -> Path:
    """A file a job option names, relative to `base` (default: the checkout): inside it or a root the site allows,
    else one line naming the option. A job is someone else's input; it must not make the site read any file."""
    base = project_root() if base is None else Path(base)
    path = resolve_inside(value, base, environ)
    if path is None:
        raise FedXViTError(
            f"job option {option}={value!r} lies outside {base}: use a path inside it, or let the site list the "
            f"folder in ${ALLOWED_ROOTS_ENV}"
        )
    return path
