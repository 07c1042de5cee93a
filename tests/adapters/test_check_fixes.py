"""Every fix `check` prints is a command that works on that adapter: for each kind of adapter the
tool produces, `check --for vllm` and `--for llama.cpp` run, and every `ailora-tools ...` command their findings
print runs as printed (only the output placeholders LORA, OUT, MERGED filled in) and exits 0."""

import itertools
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers.adapters import fake_dora_training, fake_training

from ailora_tools import convert, decompose
from ailora_tools.cli import main
from ailora_tools.demo import build_tiny_model, data_file
from ailora_tools.training.trainer import train

OUTPUTS = ("LORA", "OUT", "MERGED")  # what the user names; every other part of a fix must be filled in
COMMAND = re.compile(r"`(ailora-tools [^`]+)`")
counter = itertools.count()


def findings(adapter: Path, target: str) -> list[dict]:
    res = CliRunner().invoke(main, ["check", str(adapter), "--for", target, "--json"])
    assert res.exit_code in (0, 1), res.output
    return json.loads(res.stdout)["findings"]


def run_fixes(adapter: Path, tmp: Path) -> list[str]:
    """Run every command the findings of both servers print; return them."""
    ran = []
    for target in ("vllm", "llama.cpp"):
        for f in findings(adapter, target):
            for command in COMMAND.findall(f["fix"]):
                words = command.split()[1:]
                args = [str(tmp / f"{w.lower()}-{next(counter)}") if w in OUTPUTS else w for w in words]
                assert not [w for w in args if re.fullmatch(r"[A-Z]+", w)], f"placeholder left in {command!r}"
                res = CliRunner().invoke(main, args)
                assert res.exit_code == 0, f"[{f['rule']}] `{command}` failed: {res.output}"
                ran.append(command)
    return ran


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("fixes") / "base")


def test_fixes_of_a_plain_trained_adapter_run(llama, tmp_path):
    decompose(llama, tmp_path / "d", method="pissa", rank=4, alpha=8, progress=False)
    trained = fake_training(tmp_path / "d" / "adapter", tmp_path / "t")
    ran = run_fixes(trained, tmp_path)
    assert any("--for vllm" in c for c in ran) and any("--for llama.cpp" in c for c in ran)


def test_fixes_of_a_dora_adapter_run(llama, tmp_path):
    decompose(llama, tmp_path / "d", method="pissa", rank=4, alpha=8, dora=True, progress=False)
    trained = fake_dora_training(tmp_path / "d" / "adapter", tmp_path / "t", trained_on=tmp_path / "d" / "residual")
    ran = run_fixes(trained, tmp_path)
    assert any("--dora exact" in c for c in ran) and any("--dora approximate" in c for c in ran)
    assert any(c.startswith("ailora-tools merge") for c in ran) and not any("--for" in c for c in ran)


def test_fixes_of_a_converted_adapter_and_a_bitfit_output_run(llama, models, tmp_path):  # noqa: F811
    decompose(llama, tmp_path / "d", method="pissa", rank=4, alpha=8, progress=False)
    convert(fake_training(tmp_path / "d" / "adapter", tmp_path / "t"), tmp_path / "lora")
    assert run_fixes(tmp_path / "lora", tmp_path) == []  # a LoRA on the original: nothing to fix
    train(
        models["qwen2"], None, data_file("demo_train.jsonl"), tmp_path / "bf", bitfit=True, max_steps=1, progress=False
    )
    ran = run_fixes(tmp_path / "bf", tmp_path)
    assert ran and all(c.startswith(f"ailora-tools merge {models['qwen2']}") for c in ran)


def test_fixes_of_an_adapter_trained_on_an_nf4_residual_run(run, tmp_path):  # noqa: F811
    ran = run_fixes(run / "trained", tmp_path)
    assert any("--for vllm" in c for c in ran) and any("--for llama.cpp" in c for c in ran)
