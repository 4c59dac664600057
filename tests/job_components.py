"""Import every component a job names, as one side of the federation would: a plain script, so that
it runs in a bare environment (a hospital's install) as well as under pytest.

    python tests/job_components.py client jobs/*/app/config/config_fed_client.json
    python tests/job_components.py server jobs/*/app/config/config_fed_server.json

Prints one JSON line: the class paths imported, where fedxvit came from, and which modules of the other side it
loaded (fedxvit/__init__.py's roles: the server never imports a site module, a site never a server module, nor
MONAI on the server). Exit 1 with the first failure.
"""

import importlib
import json
import sys
from pathlib import Path

import tomllib

# NVFlare's Flower parts start the app fedxvit ships (fedxvit/flower_app, pre-deployed at the server): its ServerApp at
# the server, its ClientApp at each site (Flower sends the app folder, whose components the installed package holds)
FLOWER_PARTS = {
    "nvflare.app_opt.flower.controller.FlowerController": "serverapp",
    "nvflare.app_opt.flower.executor.FlowerExecutor": "clientapp",
}


def component_paths(config: dict) -> list[str]:
    """Class paths of the executors, components, workflows and filters of one config file."""
    paths = [e["executor"]["path"] for e in config.get("executors", [])]
    paths += [c["path"] for section in ("components", "workflows") for c in config.get(section, [])]
    paths += [
        f["path"]
        for section in ("task_data_filters", "task_result_filters")
        for group in config.get(section, [])
        for f in group.get("filters", [])
    ]
    return paths


def flower_app_paths(paths: list[str]) -> list[str]:
    """The Flower app's ServerApp or ClientApp that a Flower job's NVFlare parts start (the installed app folder)."""
    parts = [FLOWER_PARTS[p] for p in paths if p in FLOWER_PARTS]
    if not parts:
        return []
    import fedxvit

    app = tomllib.loads((Path(fedxvit.__file__).parent / "flower_app" / "pyproject.toml").read_text())
    components = app["tool"]["flwr"]["app"]["components"]
    return [components[part].replace(":", ".") for part in parts]


def import_components(side: str, config_files: list[str]) -> dict:
    paths = sorted({p for name in config_files for p in component_paths(json.load(open(name)))})
    paths += flower_app_paths(paths)
    for path in paths:
        module, _, name = path.rpartition(".")
        getattr(importlib.import_module(module), name)
    import fedxvit

    other = [f"fedxvit.{m}" for m in (fedxvit.SITE_MODULES if side == "server" else fedxvit.SERVER_MODULES)]
    if side == "server":
        other.append("monai")
    loaded = [m for m in other if m in sys.modules]
    return {"side": side, "imported": paths, "fedxvit": fedxvit.__file__, "other_side_loaded": loaded}


if __name__ == "__main__":
    side, files = sys.argv[1], sys.argv[2:]
    result = import_components(side, files)
    print(json.dumps(result))
    if result["other_side_loaded"]:
        sys.exit(f"the {side} side imported the other side's modules: {result['other_side_loaded']}")
