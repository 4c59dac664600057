"""Only the frameworks' public APIs: nothing imports NVFlare's private packages, and no fedxvit class overrides an
underscore method of an NVFlare or MONAI class (their internals may change in any release)."""

import ast
import importlib
import inspect
import pkgutil

from tiny import REPO

import fedxvit


def test_no_module_imports_nvflares_private_packages():
    offenders = []
    for folder in ("custom", "result_stat", "bench", "data_preparation", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                offenders += [
                    f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[:2] == ["nvflare", "private"]
                ]
    assert offenders == []


def test_no_class_overrides_an_underscore_method_of_nvflare_or_monai():
    overrides, framework_subclasses = [], 0
    for info in pkgutil.iter_modules(fedxvit.__path__):
        module = importlib.import_module(f"fedxvit.{info.name}")
        for cls in (c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__):
            bases = [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] in ("nvflare", "monai")]
            framework_subclasses += bool(bases)
            overrides += [
                f"{cls.__qualname__}.{name} (from {base.__module__}.{base.__qualname__})"
                for name in vars(cls)
                if name.startswith("_")
                and not name.endswith("__")
                and name != "_abc_impl"  # set by ABCMeta on every abstract class, not written by us
                for base in bases
                if name in vars(base)
            ]
    assert framework_subclasses >= 5, "the executor, persistor, filter, assembler and transform are checked"
    assert overrides == []
