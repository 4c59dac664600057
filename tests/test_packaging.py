"""The hospital's package: `pip wheel` builds fedxvit alone, and an empty venv holding that wheel plus
only the distributions its metadata declares (resolved transitively, taken from this environment
instead of downloaded again) imports every component the job names -- the client with the plain
install, the server with the `server` extra, and neither side loading the other side's modules.

.ci/run does the same with a real `pip install` from the index once per CI run.
"""

import email
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from tiny import REPO

import fedxvit
from fedxvit.methods import FLOWER_JOB, HE_JOB

pytestmark = pytest.mark.slow


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return [Requirement(r) for r in email.message_from_bytes(archive.read(meta)).get_all("Requires-Dist") or []]


def closure(requirements: list[Requirement], extras: set[str], own_name: str = "fedxvit") -> dict:
    """{canonical name: Distribution} of everything the requirements pull in (markers and extras
    evaluated), from this environment; a declared dependency that is not installed here fails."""
    found, todo = {}, [(r, extras) for r in requirements]
    own = list(requirements)
    while todo:
        req, active = todo.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (active or {""})):
            continue
        name = canonicalize_name(req.name)
        if name == own_name:  # a self-referencing extra, e.g. tools = ["fedxvit[server]"]
            todo += [(r, set(req.extras)) for r in own]
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req} (declared, or needed by a declared dependency) is not installed here")
        assert dist.version in req.specifier or not req.specifier, f"{req}: this environment has {dist.version}"
        wanted = set(req.extras)
        if name in found and wanted <= found[name][1]:
            continue
        found[name] = (dist, wanted | (found[name][1] if name in found else set()))
        todo += [(Requirement(r), found[name][1]) for r in dist.requires or []]
    return {name: dist for name, (dist, _) in found.items()}


def record_paths(dist) -> list[tuple[str, ...]]:
    """The site-packages paths a distribution installed (its RECORD), split into parts; scripts left out."""
    rows = (dist.read_text("RECORD") or "").splitlines()
    return [tuple(row.rsplit(",", 2)[0].split("/")) for row in rows if row and not row.startswith("..")]


def link_distributions(dists: dict, site_packages: Path) -> None:
    """Symlink each distribution's files into site-packages: whole top-level entries it owns alone,
    one level deeper inside folders several distributions share (nvidia/, azure/, mlflow/ ...)."""
    owners = {}
    for dist in metadata.distributions():
        for top in {parts[0] for parts in record_paths(dist)}:
            owners.setdefault(top, set()).add(canonicalize_name(dist.metadata["Name"]))
    for dist in dists.values():
        source = Path(dist.locate_file(""))
        entries = {
            parts[:1] if len(owners[parts[0]]) == 1 or len(parts) == 1 else parts[:2]
            for parts in record_paths(dist)
            if parts[0] != "__pycache__"
        }
        for parts in entries:
            target = site_packages.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists() and source.joinpath(*parts).exists():
                target.symlink_to(source.joinpath(*parts))


CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}  # no PYTHONPATH into the venvs


def build_wheel(out: Path) -> Path:
    """`pip wheel` on a copy of what the package is made of, so no build/ or egg-info lands in the checkout."""
    source = out / "source"
    shutil.copytree(
        REPO / "custom" / "fedxvit", source / "custom" / "fedxvit", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "pyproject.toml", source)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out / "dist"),
            str(source),
        ],
        check=True,
        cwd=out,
        env=CLEAN_ENV,
    )
    (wheel,) = (out / "dist").glob("fedxvit-*.whl")
    return wheel


def venv_with(wheel: Path, extras: set, root: Path) -> Path:
    """An empty venv, the wheel installed by pip, its declared dependencies linked in; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        env=CLEAN_ENV,
    )
    site_packages = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    link_distributions(closure(wheel_requirements(wheel), extras), site_packages)
    return python


def import_side(python: Path, side: str, cwd: Path, jobs=None, skip=()) -> dict:
    """Import every component of the jobs' `side` configs (all jobs, or `jobs`; none of `skip`) in `python`."""
    configs = sorted(
        str(p)
        for p in (REPO / "jobs").glob(f"*/app/config/config_fed_{side}.json")
        if (jobs is None or p.parents[2].name in jobs) and p.parents[2].name not in skip
    )
    assert configs
    # -I: no PYTHONPATH, no user site, not the checkout: only what the venv holds
    run = subprocess.run(
        [str(python), "-I", str(REPO / "tests" / "job_components.py"), side, *configs],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=CLEAN_ENV,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_wheel_alone_makes_a_client_and_with_its_server_extra_a_server(tmp_path):
    """Every job's client side imports from the wheel alone (the HE job's with the `he` extra), every job's
    server side with the `server` and `he` extras."""
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
        names = [name for name in archive.namelist() if name.startswith("fedxvit/")]
        modules = {Path(name).stem for name in names if name.endswith(".py")}
    assert sorted(n for n in names if not n.endswith(".py")) == ["fedxvit/flower_app/pyproject.toml"]
    assert tops == {"fedxvit", next(t for t in tops if t.endswith(".dist-info"))}, f"only fedxvit ships: {tops}"
    runtime = {"__init__", *fedxvit.SHARED_MODULES, *fedxvit.SITE_MODULES, *fedxvit.SERVER_MODULES}
    assert modules == runtime, f"the hospital's wheel holds the runtime modules only: {sorted(modules ^ runtime)}"
    declared = {canonicalize_name(r.name) for r in wheel_requirements(wheel) if not r.marker}
    assert {"nvflare", "torch", "timm", "monai", "numpy", "pillow"} <= declared
    assert not declared & {"mlflow", "scipy", "psutil", "matplotlib"}, "tooling stays out of a hospital's install"

    client_python = venv_with(wheel, set(), tmp_path / "client")
    # HE needs the `he` extra (TenSEAL), the Flower job the `flower` extra (flwr)
    client = import_side(client_python, "client", tmp_path, skip={HE_JOB, FLOWER_JOB})
    assert "fedxvit.executor.FedXViTExecutor" in client["imported"] and client["other_side_loaded"] == []
    assert client["fedxvit"].startswith(str(tmp_path / "client")), "the installed wheel, not the checkout"
    undeclared = subprocess.run(
        [str(client_python), "-I", "-c", "import mlflow"], capture_output=True, text=True, env=CLEAN_ENV
    )
    assert "No module named 'mlflow'" in undeclared.stderr, "only the declared distributions are in the venv"

    he_client = import_side(venv_with(wheel, {"he"}, tmp_path / "client-he"), "client", tmp_path, jobs={HE_JOB})
    assert "nvflare.app_opt.he.model_encryptor.HEModelEncryptor" in he_client["imported"]

    flower_python = venv_with(wheel, {"flower"}, tmp_path / "client-flower")
    flower_client = import_side(flower_python, "client", tmp_path, jobs={FLOWER_JOB})
    assert "fedxvit.flower_client.client_app" in flower_client["imported"] and flower_client["other_side_loaded"] == []

    server_python = venv_with(wheel, {"server", "he", "flower"}, tmp_path / "server")
    server = import_side(server_python, "server", tmp_path)
    assert "fedxvit.receivers.FederatedMLflowTracking" in server["imported"] and server["other_side_loaded"] == []
    assert "fedxvit.he.HEPartialUpdateAggregator" in server["imported"]
    assert "fedxvit.flower_server.server_app" in server["imported"]
    check = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(server_python), "check"],
        capture_output=True,
        text=True,
        env=CLEAN_ENV,
    )
    assert check.returncode == 0, f"the declared dependencies are not consistent: {check.stdout}"
