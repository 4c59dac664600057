"""Where a hospital's private data lives, found from its site name.

A hospital must be able to point its client at its data without editing the job, so the
location is looked up in this order (first hit wins):

1. env `FEDXVIT_DATA_<SITE>` (site name upper-cased, non-alphanumerics -> `_`), e.g. FEDXVIT_DATA_SITE1;
2. `local/fedxvit_site.json` in the client's workspace: `{"data_dir": "..."}` (relative paths are
   taken from that `local/` folder) -- the file a site admin keeps next to its startup kit;
3. env `FEDXVIT_DATA_ROOT`/<site>;
4. `<project_root>/data/<site>` (the embedded benchmark of `make data`).

Everything is checked before any DataLoader work, and a problem is one FedXViTError line that
names the site, the path and how it was chosen. Every datalist entry must lie inside the data folder
(fedxvit.datalist); a site that keeps images elsewhere allows that folder itself in
$FEDXVIT_ALLOWED_ROOTS (fedxvit.paths), never a job.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from fedxvit.classes import TASK_CLASSES
from fedxvit.datalist import DATALIST_FILE, load_split, read_dataset_info
from fedxvit.errors import FedXViTError
from fedxvit.paths import project_root

DATA_ROOT_ENV = "FEDXVIT_DATA_ROOT"
SITE_CONFIG_FILE = "fedxvit_site.json"
HOW_TO_SET = (
    f'set FEDXVIT_DATA_<SITE>, a {{"data_dir": ...}} in <client workspace>/local/{SITE_CONFIG_FILE}, '
    f"or {DATA_ROOT_ENV}, or run `make data` for the demo sites"
)


def site_env_var(site_name: str) -> str:
    """FEDXVIT_DATA_<SITE>: the per-site override, e.g. 'site-1' -> FEDXVIT_DATA_SITE_1."""
    return "FEDXVIT_DATA_" + re.sub(r"[^0-9A-Za-z]", "_", site_name).upper()


def locate_site_data(
    site_name: str, site_config_dir: os.PathLike | None = None, environ: dict | None = None
) -> tuple[Path, str]:
    """(data folder, how it was chosen) for a site, following the precedence above; nothing is checked."""
    environ = os.environ if environ is None else environ
    env_var = site_env_var(site_name)
    if environ.get(env_var):
        return Path(environ[env_var]).expanduser(), f"env {env_var}"
    if site_config_dir is not None:
        config_file = Path(site_config_dir) / SITE_CONFIG_FILE
        if config_file.is_file():
            try:
                data_dir = json.loads(config_file.read_text()).get("data_dir")
            except (json.JSONDecodeError, AttributeError) as exc:
                raise FedXViTError(
                    f'site {site_name}: {config_file} is not a JSON object with "data_dir": {exc}'
                ) from None
            if not data_dir:
                raise FedXViTError(f'site {site_name}: {config_file} has no "data_dir"')
            return (Path(site_config_dir) / Path(data_dir).expanduser()), f"{config_file}"
    if environ.get(DATA_ROOT_ENV):
        return Path(environ[DATA_ROOT_ENV]).expanduser() / site_name, f"env {DATA_ROOT_ENV}"
    return project_root() / "data" / site_name, "the default <project_root>/data/<site>"


def check_site_data(site_name: str, data_dir: Path, how: str, class_names=TASK_CLASSES) -> None:
    """Fail early, in one line, when the folder, its datalist, its images or its classes are wrong."""
    where = f"site {site_name}: data folder {data_dir} (from {how})"
    if not data_dir.is_dir():
        raise FedXViTError(f"{where} does not exist; {HOW_TO_SET}")
    if not (data_dir / DATALIST_FILE).is_file():
        raise FedXViTError(f"{where} has no {DATALIST_FILE}; {HOW_TO_SET}")
    try:
        for split in ("training", "validation"):
            if not load_split(data_dir, split):
                raise FedXViTError(f"no {split} images")
        found = read_dataset_info(data_dir).get("class_names")
    except FedXViTError as exc:
        raise FedXViTError(f"{where} is not usable: {exc}") from None
    if found is not None and class_names is not None and list(found) != list(class_names):
        raise FedXViTError(f"{where} has classes {found}, but the federated task expects {list(class_names)}")


def site_data_dir(
    site_name: str, site_config_dir: os.PathLike | None = None, environ: dict | None = None, class_names=TASK_CLASSES
) -> Path:
    """The checked data folder of a site (see the module docstring for the lookup order); `class_names`: what
    the job trains (None: any)."""
    data_dir, how = locate_site_data(site_name, site_config_dir, environ)
    data_dir = data_dir.resolve()
    check_site_data(site_name, data_dir, how, class_names)
    return data_dir
