"""One room per role: the hospital package holds only what NVFlare's server and sites load, each module has one
role (fedxvit/__init__.py), and the imports go one way: site and server modules import shared ones and their own
side's, never the other side's; shared modules only shared ones. Lazy imports inside functions count too."""

import ast

import pytest
from tiny import REPO

import fedxvit

PACKAGE = REPO / "custom" / "fedxvit"
ROLES = {
    **{m: "shared" for m in fedxvit.SHARED_MODULES},
    **{m: "site" for m in fedxvit.SITE_MODULES},
    **{m: "server" for m in fedxvit.SERVER_MODULES},
}
MAY_IMPORT = {"shared": {"shared"}, "site": {"shared", "site"}, "server": {"shared", "server"}}
DESK_TOOLS = ("poc", "jobs", "expert", "baselines", "jobconfig", "transfer", "simulation", "standalone")


def fedxvit_imports(source: str) -> set[str]:
    """The fedxvit modules a module's source imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "fedxvit":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedxvit."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("fedxvit.")}
    return found


def role_violations(sources: dict, roles: dict) -> list[str]:
    """'module (role) imports other (role)' for every import that goes against MAY_IMPORT, and every module
    without a role."""
    problems = [f"{m} has no role in fedxvit/__init__.py" for m in sources if m not in roles]
    for module, source in sorted(sources.items()):
        for other in sorted(fedxvit_imports(source) - {module}):
            if module in roles and roles.get(other) not in MAY_IMPORT[roles[module]]:
                problems.append(f"{module} ({roles[module]}) imports {other} ({roles.get(other, 'no role')})")
    return problems


def package_sources() -> dict:
    return {p.stem: p.read_text() for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def test_every_module_of_the_hospital_package_has_one_role_and_imports_go_one_way():
    assert sum(map(len, (fedxvit.SHARED_MODULES, fedxvit.SITE_MODULES, fedxvit.SERVER_MODULES))) == len(ROLES)
    assert set(ROLES) == set(package_sources()), "a role listed for a module that is not there, or the reverse"
    assert role_violations(package_sources(), ROLES) == []


def test_the_check_catches_a_site_module_importing_a_server_one_even_lazily():
    sources = {
        "executor": "def f():\n    from fedxvit.aggregation import MAS_FACTOR\n",
        "aggregation": "from fedxvit import protocol\n",
        "protocol": "",
        "stray": "",
    }
    roles = {"executor": "site", "aggregation": "server", "protocol": "shared"}
    assert role_violations(sources, roles) == [
        "stray has no role in fedxvit/__init__.py",
        "executor (site) imports aggregation (server)",
    ]
    assert role_violations({"fedsm": "import fedxvit.training\n"}, {"fedsm": "shared", "training": "site"}) == [
        "fedsm (shared) imports training (site)"
    ]


@pytest.mark.parametrize("tool", DESK_TOOLS)
def test_desk_tools_live_in_tooling_not_in_the_hospital_package(tool):
    assert not (PACKAGE / f"{tool}.py").exists() and (REPO / "tooling" / f"{tool}.py").is_file()
    assert tool not in ROLES
