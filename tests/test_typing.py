"""The package ships ``py.typed``: its annotations must hold, or type checkers mislead its users; and
what it exports says what it does."""

import dataclasses
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_type_checks(tmp_path):
    pytest.importorskip("mypy", reason="mypy comes with the dev extra (make install)")
    # the settings are pyproject.toml's [tool.mypy]; a fresh cache keeps the run independent of earlier ones
    done = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "MYPY_FORCE_COLOR": "0"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Success: no issues found" in done.stdout



def _modules() -> list[str]:
    import softvq

    return sorted(info.name for info in pkgutil.walk_packages(softvq.__path__, "softvq."))


def _undocumented(module_name: str) -> list[str]:
    """Public classes and functions a module defines, and the public methods and properties of
    those classes, that have no docstring (an override inherits its base's, as help() shows it).
    ``forward``/``backward`` are exempt (the class says what the module computes), and so are the
    sub-commands' ``register``/``run`` (the module docstring is the command's)."""
    module = importlib.import_module(module_name)
    missing = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if module_name.startswith("softvq.cli.") and name in ("register", "run"):
            continue
        own_doc = obj.__doc__ if inspect.isfunction(obj) else vars(obj).get("__doc__")
        if not own_doc or (dataclasses.is_dataclass(obj) and own_doc.startswith(f"{name}(")):
            missing.append(name)  # a dataclass's generated docstring is only its signature
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or attr in ("forward", "backward"):
                    continue
                target = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                if inspect.isfunction(target) and not inspect.getdoc(getattr(obj, attr) if not isinstance(
                        member, property) else member):
                    missing.append(f"{name}.{attr}")
    return [f"{module_name}.{name}" for name in missing]


def test_every_public_class_function_and_method_has_a_docstring():
    assert [name for module in _modules() for name in _undocumented(module)] == []
