"""Every exported name resolves, and every exported function/class is documented."""

import importlib
import inspect

import pytest

PACKAGES = ["msam", "analysis", "landscape"]


@pytest.mark.parametrize("package", PACKAGES)
def test_all_names_resolve_and_are_documented(package):
    mod = importlib.import_module(package)
    assert mod.__all__, f"{package}.__all__ is empty"
    assert len(set(mod.__all__)) == len(mod.__all__), "duplicate names in __all__"
    undocumented = []
    for name in mod.__all__:
        obj = getattr(mod, name)  # AttributeError names the missing export
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and not (obj.__doc__ or "").strip():
            undocumented.append(name)
    assert not undocumented, f"{package}: no docstring for {undocumented}"


def test_console_script_entry_point_exists():
    from landscape.cli import main

    assert callable(main)
