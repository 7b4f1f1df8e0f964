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


def test_every_listed_name_of_every_module_is_documented():
    # a submodule's __all__ holds the names only it exports (tests/test_import_paths.py)
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    undocumented = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__main__":
                continue
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            try:
                mod = importlib.import_module(name)
            except ModuleNotFoundError as exc:  # an integration whose framework is absent
                if exc.name and exc.name.split(".")[0] in PACKAGES:
                    raise
                continue
            for public in getattr(mod, "__all__", ()):
                obj = getattr(mod, public)
                if (inspect.isfunction(obj) or inspect.isclass(obj)) and not (obj.__doc__ or "").strip():
                    undocumented.append(f"{name}.{public}")
    assert not undocumented, f"no docstring for {undocumented}"


def test_console_script_entry_point_runs(capsys):
    # the `landscape` script named in pyproject resolves and answers --help with exit code 0
    import pathlib

    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["landscape"].partition(":")
    main = getattr(importlib.import_module(module), attr)
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("sharpness", "hessian", "slice", "report", "demo", "reproduce"):
        assert command in out, f"`landscape --help` does not list {command!r}"


# functions whose ``loss_fn`` is an already resolved callable, not a name (``LossFn``)
RESOLVED_LOSS = {"analysis.losses.loss_terms", "analysis.checks.check_first_batch",
                 "analysis.target_checks.check_targets", "analysis.target_checks.check_lm_targets",
                 "analysis.evaluation.correct_count", "analysis.evaluation.accuracy_per_term",
                 "analysis.evaluation.accuracy_unit", "landscape.train_step"}
# parameters named ``data`` that are not a data set
NOT_DATA = {"landscape.reproduce.ExperimentResult"}  # the measured numbers (a dict)


def _annotation(fn, param: str) -> str:
    """The annotation of ``param`` as written (a string under ``from __future__ import
    annotations``; an evaluated alias is named by equality)."""
    ann = inspect.signature(fn).parameters[param].annotation
    if isinstance(ann, str):
        return ann
    from analysis import Data, LossSpec

    for text, alias in (("Data", Data), ("LossSpec", LossSpec), ("Data | None", Data | None)):
        if ann == alias:
            return text
    return repr(ann)


def test_data_and_loss_are_typed_by_the_one_alias_each():
    # every exported function or class taking ``data`` / ``loss_fn`` names analysis.Data /
    # analysis.LossSpec (they were Any, Data | DataSource, Data, str | LossFn | None, ...)
    from tests.test_import_paths import listings

    assert {"Data", "LossSpec"} <= set(importlib.import_module("analysis").__all__)
    bad = []
    for (public, _), mods in sorted(listings().items()):
        obj = getattr(importlib.import_module(mods[0]), public)
        fn = obj.__init__ if inspect.isclass(obj) else obj
        if not inspect.isfunction(fn) or mods[0].split(".")[0] == "msam":
            continue  # msam imports torch only: its recalibrate_batchnorm(data) stays Any
        params = inspect.signature(fn).parameters
        where = f"{mods[0]}.{public}"
        for p in ("data", "bn_data"):
            if where not in NOT_DATA and p in params and _annotation(fn, p) not in ("Data", "Data | None"):
                bad.append(f"{where}({p}: {_annotation(fn, p)})")
        if "loss_fn" in params and where not in RESOLVED_LOSS \
                and _annotation(fn, "loss_fn") != "LossSpec":
            bad.append(f"{where}(loss_fn: {_annotation(fn, 'loss_fn')})")
    assert not bad, "entry points not typed with analysis.Data / analysis.LossSpec: " + ", ".join(bad)
