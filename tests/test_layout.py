"""The package's shape: stages over shared ground, public names that import, options declared once."""
import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ailora_tools

PKG = Path(ailora_tools.__file__).parent
README = PKG.parent / "README.md"
#: the pipeline's stages, left to right: a stage may import shared ground and the stages to its left
STAGES = ["init", "decomposition", "training", "adapters", "analysis", "comparison"]
ENTRY_POINTS = {"cli", "demo", "__init__"}


def test_every_public_name_imports_and_is_listed():
    for name in ailora_tools.__all__:
        assert getattr(ailora_tools, name) is not None, name
    namespace = {}
    exec("from ailora_tools import *", namespace)
    assert set(ailora_tools.__all__) <= set(namespace)
    assert set(ailora_tools.__all__) <= set(dir(ailora_tools))
    for stage in STAGES:
        package = importlib.import_module(f"ailora_tools.{stage}")
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{stage}.{name}"


def test_modules_moved_in_the_new_layout_keep_their_old_import_path():
    for old, new in ailora_tools.MOVED.items():
        module, target = importlib.import_module(f"ailora_tools.{old}"), importlib.import_module(f"ailora_tools.{new}")
        public = next(n for n in vars(target) if not n.startswith("_") and callable(getattr(target, n)))
        assert getattr(module, public) is getattr(target, public), old
    from ailora_tools.calibration import calibrate  # the README of 0.1 named these
    from ailora_tools.lora_da import factor_input

    assert calibrate.__module__ == "ailora_tools.init.lora_da.calibration" and factor_input is not None


def test_every_readme_import_line_runs():
    lines = sorted({m.strip() for m in re.findall(r"^\s*((?:from ailora_tools\S* import .+)|(?:import ailora_tools\S*))$",
                                                  README.read_text(), flags=re.M)})
    assert len(lines) >= 2
    for line in lines:
        exec(line, {})


def _imports(path: Path) -> set[str]:
    """The ailora_tools modules a file imports, as dotted names below the package."""
    here = path.relative_to(PKG).with_suffix("").parts
    package = here[:-1] if here[-1] != "__init__" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            found.add(".".join([*base, *(node.module.split(".") if node.module else [])]))
    return found


def test_no_module_depends_on_one_above_its_stage():
    top = {p.stem for p in PKG.glob("*.py")} | {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    shared = top - set(STAGES) - ENTRY_POINTS
    assert len({p.stem for p in PKG.glob("*.py")} - ENTRY_POINTS) <= 10, "at most about ten top-level modules"
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).parts
        owner = rel[0].removesuffix(".py")
        if owner in ENTRY_POINTS:
            continue
        for dep in _imports(path):
            first = dep.split(".")[0] if dep else ""
            if owner in shared:
                assert first not in STAGES, f"{path.relative_to(PKG)} (shared ground) imports the stage {dep}"
            elif first in STAGES:
                assert STAGES.index(first) <= STAGES.index(owner), f"{path.relative_to(PKG)} imports {dep}, a later stage"


@pytest.mark.slow
def test_a_new_option_field_reaches_train_and_compare():
    """One field added to TrainOptions appears in both commands' --help (the options are generated from it)."""
    script = """
import dataclasses
from click.testing import CliRunner
from ailora_tools import options
options.TrainOptions = dataclasses.make_dataclass(
    "TrainOptions", [("grad_clip", float, options.option(1.0, "Clip gradients at this norm.", above=0))],
    bases=(options.TrainOptions,))
from ailora_tools.cli import main
for command in ("train", "compare"):
    text = CliRunner().invoke(main, [command, "--help"]).output
    assert "--grad-clip" in text and "Clip gradients at this norm." in text, (command, text)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_options_are_checked_once_for_library_and_command():
    from ailora_tools.errors import OptionError
    from ailora_tools.options import DecomposeOptions, InitOptions, TrainOptions

    assert InitOptions(targets="q_proj,k_proj").targets == ("q_proj", "k_proj")
    for cls, bad in ((DecomposeOptions, {"rank": 0}), (DecomposeOptions, {"alpha": 0.0}),
                     (TrainOptions, {"lr": float("nan")}), (TrainOptions, {"scheduler": "step"})):
        with pytest.raises(OptionError, match="--" + next(iter(bad)).replace("_", "-")):
            cls.build(**bad)
    with pytest.raises(OptionError, match="no setting ranks"):
        DecomposeOptions.build(ranks=4)
