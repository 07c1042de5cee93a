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
STAGES = ["init", "decomposition", "training", "adapters", "servers", "analysis", "comparison"]
ENTRY_POINTS = {"cli", "demo", "testing", "__init__"}  # above every stage: they may use them all


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


def test_every_readme_import_line_runs():
    lines = sorted(
        {
            m.strip()
            for m in re.findall(
                r"^\s*((?:from ailora_tools\S* import .+)|"
                r"(?:import ailora_tools\S*))$",
                README.read_text(),
                flags=re.M,
            )
        }
    )
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
    top = {p.stem for p in PKG.glob("*.py")} | {
        p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()
    }
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
                assert STAGES.index(first) <= STAGES.index(owner), (
                    f"{path.relative_to(PKG)} imports {dep}, a later stage"
                )


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
    """The library's error names the keyword (`rank`), the command's the flag (`--rank`), from one check."""
    from click.testing import CliRunner

    from ailora_tools.cli import main
    from ailora_tools.errors import OptionError
    from ailora_tools.options import DecomposeOptions, InitOptions, TrainOptions

    assert InitOptions(targets="q_proj,k_proj").targets == ("q_proj", "k_proj")
    for cls, bad, text in (
        (DecomposeOptions, {"rank": 0}, "rank 0: must be at least 1"),
        (DecomposeOptions, {"alpha": 0.0}, "alpha 0.0: must be greater than 0"),
        (TrainOptions, {"lr": float("nan")}, "lr nan: must be a finite number"),
        (TrainOptions, {"warmup_ratio": 0.1, "warmup": 3}, "warmup_ratio 0.1 and warmup 3: give one"),
    ):
        with pytest.raises(OptionError, match=f"^{text}") as caught:
            cls.build(**bad)
        assert caught.value.field == next(iter(bad)) and "--" not in str(caught.value)
    with pytest.raises(OptionError, match="no setting ranks"):
        DecomposeOptions.build(ranks=4)
    done = CliRunner().invoke(main, ["decompose", "m", "-o", "x", "--rank", "0", "--role", "q_proj=minor"])
    assert done.exit_code == 1 and "error: --rank 0: must be at least 1" in done.output, done.output
    done = CliRunner().invoke(
        main, ["train", "--base", "b", "--data", "d", "-o", "x", "--warmup-ratio", "0.1", "--warmup", "3"]
    )
    assert "error: --warmup-ratio 0.1 and --warmup 3: give one of the two" in done.output, done.output


def test_get_ailora_model_errors_name_its_keywords(tiny):
    from transformers import AutoModelForCausalLM

    from ailora_tools import get_ailora_model
    from ailora_tools.errors import OptionError

    model = AutoModelForCausalLM.from_pretrained(tiny("llama"))
    with pytest.raises(OptionError, match=r"^loftq_iters: applies to a quantised residual; add quantize nf4$"):
        get_ailora_model(model, loftq_iters=2, progress=False)


def test_calibrate_out_of_range_numbers_are_option_errors(tiny):
    from ailora_tools.errors import OptionError
    from ailora_tools.init.lora_da.calibration import calibrate

    with pytest.raises(OptionError, match=r"^batch_size 0 / activation_budget 0: need") as caught:
        next(calibrate(tiny("llama"), [], ["model.layers.0.self_attn.q_proj"], batch_size=0, activation_budget=0))
    assert caught.value.field == "batch_size"


COMMANDS = [
    "decompose",
    "train",
    "convert",
    "merge",
    "spectrum",
    "check",
    "export-gguf",
    "export-base",
    "push",
    "compare",
    "demo",
    "verify",
    "serve-check",
]


def test_every_command_option_comes_from_a_dataclass_and_shows_in_help():
    """Each field of a command's option dataclass is one of its flags, with its help text, and the choice lists
    are the library's own."""
    import dataclasses

    from click.testing import CliRunner

    from ailora_tools import options
    from ailora_tools.adapters import check, dora, gguf_export, server_base, serving
    from ailora_tools.cli import main
    from ailora_tools.cli.flags import flag_of
    from ailora_tools.comparison import plan as comparison

    assert (
        serving.SERVERS,
        check.TARGETS,
        gguf_export.OUTTYPES,
        dora.DORA_MODES,
        server_base.SERVER_FORMATS,
        comparison.METRICS,
    ) == (
        options.SERVERS,
        options.CHECK_TARGETS,
        options.OUTTYPES,
        options.DORA_MODES,
        options.SERVER_FORMATS,
        options.METRICS,
    )
    of = {
        "decompose": [options.DecomposeOptions, options.Streams],
        "train": [options.TrainOptions, options.OnBase],
        "convert": [options.ConvertOptions],
        "merge": [options.MergeOptions],
        "spectrum": [options.SpectrumOptions],
        "check": [options.CheckOptions],
        "export-gguf": [options.ExportGgufOptions],
        "export-base": [options.ExportBaseOptions],
        "push": [options.PushOptions],
        "compare": [options.CompareOptions, options.InitOptions, options.TrainOptions],
        "demo": [options.DemoOptions],
        "verify": [options.VerifyOptions],
        "serve-check": [options.ServeCheckOptions],
    }
    assert set(of) == set(COMMANDS) == set(main.commands)
    for command, classes in of.items():
        params = {p.name: p for p in main.commands[command].params}
        text = " ".join(CliRunner().invoke(main, [command, "--help"], terminal_width=2000).output.split())
        for cls in classes:
            for f in dataclasses.fields(cls):
                if command == "compare" and f.name in ("method", "dora", "bitfit"):
                    continue  # compare runs several methods; bitfit and dora are names in --methods
                assert f.name in params and flag_of(f.name) in params[f.name].opts, (command, f.name)
                assert flag_of(f.name) in text, (command, f.name)
                if f.metadata.get("choices") and f.name != "method":
                    choices = [str(c) for c in f.metadata["choices"]]
                    assert list(params[f.name].type.choices) == choices, (command, f.name)
        hand = {n for n, p in params.items() if isinstance(p, __import__("click").Option)} - {
            f.name
            for cls in [*classes, options.Report, options.Streams, options.OnBase]
            for f in dataclasses.fields(cls)
        }
        assert hand <= {"out", "base", "adapter", "data", "trained", "config"}, (command, hand)


def test_importing_the_package_and_its_cli_changes_no_global_state():
    """`import ailora_tools.cli` leaves warnings, sys.modules and the environment as they were: the command
    process's set-up is `cli.run`'s."""
    script = """
import os, sys, warnings
state = lambda: (warnings.showwarning, "kernels" in sys.modules, dict(os.environ), list(warnings.filters))
before = state()
import ailora_tools, ailora_tools.cli, ailora_tools.options, ailora_tools.config, ailora_tools.console
ailora_tools.cli.main  # the commands
assert "torch" not in sys.modules  # the CLI starts hashing before torch loads
for name, a, b in zip(("showwarning", "kernels", "environ", "filters"), before, state()):
    assert a == b, (name, a, b)
ailora_tools.decompose, ailora_tools.train, ailora_tools.convert, ailora_tools.get_ailora_model  # torch and co. load
for name, a, b in zip(("showwarning", "kernels", "environ"), before, state()):  # (torch adds warning filters)
    assert a == b, (name, a, b)
print("ok")
"""
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("USE_HUB_KERNELS", "TQDM_MININTERVAL")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
