"""Safe loading: the declared torch range excludes the releases whose `weights_only=True` still runs code from a
crafted checkpoint (CVE-2025-32434, fixed in 2.6), and no load anywhere in the repository unpickles code."""

import ast

import pytest
import tomllib
from packaging.requirements import Requirement
from tiny import REPO

FIRST_SAFE_TORCH = "2.6.0"
LAST_UNSAFE_TORCH = "2.5.1"


def declared_requirements() -> list[Requirement]:
    """Every requirement pyproject.toml declares: the hospital's and server's install, and each extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = [project["dependencies"], *project.get("optional-dependencies", {}).values()]
    return [Requirement(text) for group in groups for text in group]


def test_every_declared_torch_range_excludes_torch_before_2_6():
    torch = [r for r in declared_requirements() if r.name == "torch"]
    assert torch, "pyproject.toml declares no torch"
    for requirement in torch:
        assert LAST_UNSAFE_TORCH not in requirement.specifier, f"{requirement} admits torch {LAST_UNSAFE_TORCH}"
        assert FIRST_SAFE_TORCH in requirement.specifier, f"{requirement} refuses the first safe torch"


def unsafe_loads(source: str) -> list[str]:
    """Loads in Python source that may unpickle code: torch.load without a literal weights_only=True, pickle's
    loads, torch.jit.load and numpy's allow_pickle=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        safe = isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True
        if (name == "torch.load" and not safe) or name in ("pickle.load", "pickle.loads", "torch.jit.load"):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        pickled = keywords.get("allow_pickle")
        if isinstance(pickled, ast.Constant) and pickled.value is True:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_scan_sees_an_unsafe_load():
    assert unsafe_loads("import torch\ntorch.load('a.pt')\ntorch.load('b.pt', weights_only=True)") == [
        "line 2: torch.load('a.pt')"
    ]
    assert len(unsafe_loads("torch.load(p, weights_only=False)\npickle.loads(b)\nnp.load(p, allow_pickle=True)")) == 3


@pytest.mark.parametrize("folder", ["custom", "data_preparation", "result_stat", "bench", "tests"])
def test_no_load_in_the_repository_unpickles_code(folder):
    files = sorted((REPO / folder).rglob("*.py"))
    assert files
    found = {str(f.relative_to(REPO)): unsafe_loads(f.read_text()) for f in files}
    assert not {f: loads for f, loads in found.items() if loads}
