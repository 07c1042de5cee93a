"""Model identity: every output carries the identity of the model it was made from and of the base it applies to, and
every command that puts an adapter on a base checks it. One test (or more) per guarantee, and a property
test over (model, adapter) pairs from two models of equal shapes and both bases."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli, killed_at_update, make_config, one_line_error, train_args, train_dec

from ailora_tools.adapters import check_adapter, convert, export_gguf, merge
from ailora_tools.decomposition import decompose
from ailora_tools.demo import build_tiny_model, data_file
from ailora_tools.errors import AiloraError, OptionError, TargetError
from ailora_tools.io.checkpoint import Checkpoint
from ailora_tools.manifests import base_of, check_base
from ailora_tools.training import train
from ailora_tools.verify import verify

MODELS = ("A", "B")
ROOT = Path(__file__).parents[2]


def rows(n: int, offset: int = 0) -> str:
    return "".join(
        json.dumps({"prompt": f"Q: {i} + 1 = ?\nA: ", "completion": str(i + 1)}) + "\n"
        for i in range(offset, offset + n)
    )


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two tiny Llamas of equal shapes (A, B: other seeds), each decomposed, trained 2 steps and converted."""
    root = tmp_path_factory.mktemp("identity")
    out = {}
    for seed, x in enumerate(MODELS):
        base = build_tiny_model(root / x / "base", seed=seed)
        decompose(base, root / x / "dec", rank=4, progress=False)
        train_dec(
            root / x / "dec", data_file("demo_train.jsonl"), root / x / "trained", max_steps=2, batch_size=2, lr=1e-2
        )
        convert(root / x / "trained", root / x / "lora")
        out[x] = {
            "original": base,
            "residual": root / x / "dec" / "residual",
            "initial": root / x / "dec" / "adapter",
            "trained": root / x / "trained",
            "lora": root / x / "lora",
        }
    out["root"] = root
    return out


def _logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.arange(3, 40).view(1, -1)).logits


# the pairs: adapter (model, which) x base (model, kind); accepted exactly when the models and the kinds agree
ADAPTERS = [(x, a) for x in MODELS for a in ("initial", "trained", "lora")]
BASES = [(x, k) for x in MODELS for k in ("original", "residual")]
KIND = {"initial": "residual", "trained": "residual", "lora": "original"}


def _accepted(adapter, base) -> bool:
    return adapter[0] == base[0] and KIND[adapter[1]] == base[1]


def test_two_random_models_of_equal_shapes_have_other_identities(two):
    a, b = (base_of(two[x]["lora"]) for x in MODELS)
    assert (
        a.kind == b.kind == "original"
        and a.samples["original"]
        and a.samples["original"].keys() == b.samples["original"].keys()
    )
    assert all(a.samples["original"][t] != b.samples["original"][t] for t in a.samples["original"])
    for x in MODELS:  # every adapter-bearing manifest records its applies_to block
        for path, name in (
            (two[x]["initial"].parent, "ailora.json"),
            (two[x]["trained"], "ailora-train.json"),
            (two[x]["lora"], "ailora-convert.json"),
        ):
            block = json.loads((path / name).read_text())["applies_to"]
            assert block["samples"] and block["original"]["model"] == str(two[x]["original"].absolute())


@pytest.mark.parametrize("adapter", ADAPTERS, ids="-".join)
def test_exactly_the_matching_bases_are_accepted_by_merge_and_check(two, tmp_path, adapter):
    for base in BASES:
        path, where = two[adapter[0]][adapter[1]], two[base[0]][base[1]]
        if _accepted(adapter, base):
            check_base(path, Checkpoint.open(where))
            merge(where, path, tmp_path / "m", progress=False, overwrite=True)
        else:
            with pytest.raises(TargetError, match=str(where)):
                check_base(path, Checkpoint.open(where))
            with pytest.raises(TargetError):
                merge(where, path, tmp_path / "x", progress=False)
            assert not (tmp_path / "x" / "ailora-merge.json").exists()
        # serving: only a LoRA on the original passes, and only with its own original as --base
        served = adapter[1] == "lora" and base[1] == "original"
        findings = check_adapter(path, target="llama.cpp", base=where)
        assert (not findings) == (served and adapter[0] == base[0]), findings
        if served:
            if adapter[0] == base[0]:
                export_gguf(path, where, tmp_path / "a.gguf", overwrite=True)
            else:
                with pytest.raises(TargetError, match="applies to the original"):
                    export_gguf(path, where, tmp_path / "b.gguf")
                assert not (tmp_path / "b.gguf").exists()


@pytest.mark.parametrize("model", MODELS)
def test_exactly_the_matching_bases_are_accepted_by_train(two, tmp_path, model):
    data = tmp_path / "d.jsonl"
    data.write_text(rows(4))
    for base in BASES:
        where = two[base[0]][base[1]]
        if _accepted((model, "initial"), base):
            train(where, two[model]["initial"], data, tmp_path / "ok", max_steps=1, batch_size=2, progress=False)
        else:
            res = cli(
                "train", "--base", where, "--adapter", two[model]["initial"], "--data", data, "-o", tmp_path / "t"
            )
            one_line_error(res, str(where))
            assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("pair", [(t, i) for t in MODELS for i in MODELS], ids="-".join)
def test_exactly_the_matching_initial_is_accepted_by_convert(two, tmp_path, pair):
    trained, initial = two[pair[0]]["trained"], two[pair[1]]["initial"]
    if pair[0] == pair[1]:
        convert(trained, tmp_path / "l", initial=initial)
    else:
        one_line_error(
            cli("convert", "--trained", trained, "--initial", initial, "-o", tmp_path / "l"),
            f"--initial {initial}",
            str(two[pair[0]]["initial"]),
        )
        assert not (tmp_path / "l").exists()


# 1. a LoRA written by convert, merged onto a residual: exit 0 and 0.96 logits off
def test_a_converted_lora_on_the_residual_is_refused(two, tmp_path):
    res = cli("merge", two["A"]["residual"], two["A"]["lora"], "-o", tmp_path / "m")
    one_line_error(
        res,
        "applies to the original model",
        "is a residual decompose wrote from it",
        f"pass BASE {two['A']['original'].absolute()}",
    )
    assert not (tmp_path / "m" / "ailora-merge.json").exists()
    # and on its own original the merged model is the trained one
    assert cli("merge", two["A"]["original"], two["A"]["lora"], "-o", tmp_path / "ok", "--quiet").exit_code == 0
    assert cli("merge", two["A"]["residual"], two["A"]["trained"], "-o", tmp_path / "tr", "--quiet").exit_code == 0
    assert (_logits(tmp_path / "ok") - _logits(tmp_path / "tr")).abs().max() < 1e-4


# 2. convert --initial naming another adapter than the training manifest: exit 0, "error 0.0", 0.25 off
def test_convert_refuses_an_initial_adapter_the_manifest_contradicts(two, tmp_path):
    other = tmp_path / "other"
    decompose(two["A"]["original"], other, rank=4, seed=7, progress=False)  # same model, other draw
    one_line_error(
        cli("convert", "--trained", two["A"]["trained"], "--initial", other / "adapter", "-o", tmp_path / "l"),
        "--initial",
        "drop --initial",
    )
    assert not (tmp_path / "l").exists()
    copy = shutil.copytree(two["A"]["initial"], tmp_path / "copy")  # a copy of the recorded one is fine
    assert convert(two["A"]["trained"], tmp_path / "l2", initial=copy)["modules"] > 0


def test_convert_refuses_a_recorded_initial_adapter_that_changed(two, tmp_path):
    root = tmp_path / "x"
    shutil.copytree(two["A"]["initial"].parent, root / "dec")
    train_dec(root / "dec", data_file("demo_train.jsonl"), root / "t", max_steps=1, batch_size=2)
    shutil.copy(two["B"]["initial"] / "adapter_model.safetensors", root / "dec" / "adapter")
    with pytest.raises(OptionError, match="changed since training"):
        convert(root / "t", tmp_path / "l")


# 3. another model of the same shapes: train and merge accepted it
def test_another_model_of_equal_shapes_is_refused_and_force_records_a_warning(two, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(rows(4))
    res = cli(
        "train", "--base", two["B"]["residual"], "--adapter", two["A"]["initial"], "--data", data, "-o", tmp_path / "t"
    )
    one_line_error(
        res,
        f"applies to the residual {two['A']['residual']}",
        f"--base {two['B']['residual']} is the residual of another decomposition",
        "--force",
    )
    res = cli("merge", two["B"]["original"], two["A"]["lora"], "-o", tmp_path / "m")
    one_line_error(res, f"BASE {two['B']['original']} is another model", f"pass BASE {two['A']['original'].absolute()}")
    res = cli("merge", two["B"]["original"], two["A"]["lora"], "-o", tmp_path / "m", "--force", "--quiet")
    assert res.exit_code == 0, res.output
    warnings = json.loads((tmp_path / "m" / "ailora-merge.json").read_text())["warnings"]
    assert len(warnings) == 1 and "--force" in warnings[0] and "another model" in warnings[0]
    res = cli(
        "train", "--base", two["B"]["residual"], "--adapter", two["A"]["initial"], "--data", data, "-o", tmp_path / "t",
        *"--force --max-steps 1 --quiet".split(),
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "t" / "ailora-train.json").read_text())
    assert manifest["warnings"] and manifest["applies_to"]["model"] == str(two["B"]["residual"].absolute())
    check_base(tmp_path / "t", Checkpoint.open(two["B"]["residual"]))  # it belongs to the base it was trained on


def test_the_residual_is_recognised_when_moved_and_a_bare_peft_adapter_is_not_checked(two, tmp_path):
    moved = shutil.copytree(two["A"]["residual"], tmp_path / "elsewhere")
    check_base(two["A"]["trained"], Checkpoint.open(moved))
    bare = shutil.copytree(two["A"]["lora"], tmp_path / "bare")
    (bare / "ailora-convert.json").unlink()
    assert base_of(bare).kind is None
    check_base(bare, Checkpoint.open(two["B"]["residual"]))  # no manifest: nothing to check it against


# 4. --targets '' decomposed 0 modules and exited 0
def test_empty_targets_are_refused(two, tmp_path):
    one_line_error(cli("decompose", two["A"]["original"], "-o", tmp_path / "o", "--targets", ""), "--targets")
    one_line_error(cli("decompose", two["A"]["original"], "-o", tmp_path / "o", "--targets", " , "), "--targets")
    assert not (tmp_path / "o").exists()


# 5. verify on a compare output with a damaged trained adapter inside: "ok"
def test_verify_checks_every_manifest_below(two, tmp_path):
    out = tmp_path / "cmp"
    (out / "ailora").mkdir(parents=True)
    (out / "compare.md").write_text("report\n")
    from ailora_tools.io.hashing import file_digest

    digest = file_digest(out / "compare.md")
    (out / "compare.json").write_text(json.dumps({"files": {"output": {"compare.md": digest}}}))
    shutil.copytree(two["A"]["trained"], out / "ailora" / "trained")
    assert verify(out)["problems"] == []
    weights = out / "ailora" / "trained" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")
    report = verify(out)
    assert report["problems"] == [
        "ailora/trained: adapter_model.safetensors: content differs from the manifest (the file changed or is corrupt)"
    ], report
    res = cli("verify", out)
    assert res.exit_code == 1 and "ailora/trained" in res.output


# 6. train --resume after the data changed in place
@pytest.mark.parametrize("new_rows", [2, 8], ids=["fewer-rows", "same-rows"])
def test_resume_refuses_changed_data(two, tmp_path, monkeypatch, new_rows):
    data = tmp_path / "d.jsonl"
    data.write_text(rows(8))
    args = dict(max_steps=4, batch_size=2, save_every=1, progress=False)
    with killed_at_update(monkeypatch, 3):
        train(two["A"]["residual"], two["A"]["initial"], data, tmp_path / "t", **args)
    data.write_text(rows(new_rows, offset=100))
    res = cli(
        *train_args(two["A"]["residual"].parent, data, tmp_path / "t"),
        *"--max-steps 4 --batch-size 2 --save-every 1 --resume".split(),
    )  # fmt: skip
    one_line_error(res, "--resume: --data changed since the run", "--overwrite")
    assert not (tmp_path / "t" / "ailora-train.json").exists()
    data.write_text(rows(8))  # restored: the run finishes
    train(two["A"]["residual"], two["A"]["initial"], data, tmp_path / "t", resume=True, **args)
    manifest = json.loads((tmp_path / "t" / "ailora-train.json").read_text())
    assert manifest["inputs"]["--data"].startswith("blake3")


# 7. the public names: covered by test_layout.py::test_every_public_name_imports_and_is_listed


# 10. --resume on a finished run (with other settings: with the same ones it is a no-op, test_train_resume.py); -o
# naming a file
def test_resume_of_a_finished_run_with_other_settings_says_it_is_complete(two, tmp_path):
    shutil.copytree(two["A"]["trained"], tmp_path / "t")
    res = cli(
        *train_args(two["A"]["residual"].parent, data_file("demo_train.jsonl"), tmp_path / "t"),
        "--resume",
        "--quiet",
    )
    one_line_error(res, "(complete: ailora-train.json is written) used other settings", "--overwrite")


def test_an_output_that_is_a_file_is_refused(two, tmp_path):
    (tmp_path / "f").write_text("mine")
    one_line_error(
        cli("decompose", two["A"]["original"], "-o", tmp_path / "f", "--rank", "4"), "is a file", "directory"
    )
    assert (tmp_path / "f").read_text() == "mine"


# 8. get_ailora_model: a classification head left frozen and unsaved, a string of targets, a PeftModel, flag names
def test_get_ailora_model_trains_and_saves_a_new_classification_head(tmp_path):
    from safetensors import safe_open
    from transformers import BertForSequenceClassification

    from ailora_tools import get_ailora_model

    torch.manual_seed(0)
    model = BertForSequenceClassification(make_config("bert"))  # built from a config: no `architectures` yet
    peft = get_ailora_model(model, targets="query,value", rank=4, progress=False)
    config = peft.peft_config["default"]
    assert config.task_type == "SEQ_CLS" and "classifier" in config.modules_to_save
    assert set(config.target_modules) == {"query", "value"}
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trainable) and any("lora_A" in n for n in trainable)
    peft.save_pretrained(tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        assert any("classifier" in k for k in f.keys())


def test_get_ailora_model_errors_name_its_arguments():
    from transformers import LlamaForCausalLM

    from ailora_tools import get_ailora_model
    from ailora_tools.errors import UnsupportedError

    model = LlamaForCausalLM(make_config("llama"))
    for kwargs, needle in (
        ({"targets": "q_proj,nope"}, "targets: 'nope' matches no module"),
        ({"rank": 0}, "rank 0: must be at least 1"),
        ({"method": "x"}, "method 'x'"),
        ({"roles": {"q_proj": "big"}}, "roles q_proj=big"),
    ):
        with pytest.raises(AiloraError) as e:
            get_ailora_model(model, progress=False, **kwargs)
        assert needle in str(e.value) and "--" not in str(e.value), e.value
    peft = get_ailora_model(model, method="pissa", targets="q_proj,k_proj", rank=4, progress=False)
    assert set(peft.peft_config["default"].target_modules) == {"q_proj", "k_proj"}
    with pytest.raises(UnsupportedError, match="already holds PEFT adapter layers") as e:
        get_ailora_model(peft, rank=4, progress=False)
    assert "base_layer" not in str(e.value)


# 9. progress bars in a log: at most every 30 s; compare --quiet: no library chatter
def _run_cli(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "ailora_tools.cli", *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT
    )


def test_progress_bars_in_a_log_redraw_rarely(two, tmp_path):
    res = _run_cli(
        *train_args(two["A"]["residual"].parent, data_file("demo_train.jsonl"), tmp_path / "t"),
        *"--max-steps 30 --batch-size 2".split(),
    )
    assert res.returncode == 0, res.stderr
    bar = [part for part in res.stderr.replace("\r", "\n").splitlines() if part.startswith("train")]
    assert 1 <= len(bar) <= 3, bar  # the start, the end: the run takes less than 30 s


def test_compare_quiet_prints_nothing_but_the_result(two, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(rows(16))
    res = _run_cli(
        "compare",
        two["A"]["original"],
        "--data",
        data,
        "-o",
        tmp_path / "c",
        *"--methods lora,lora-da --rank 4 --max-steps 2 --batch-size 2 --quiet".split(),
    )
    assert res.returncode == 0, res.stderr
    assert all(line.startswith("warning: LoRA-DA") for line in res.stderr.splitlines()), res.stderr


# 11. LoRA-DA on few, repetitive calibration samples: rank-deficient statistics are named, with what to do
def test_lora_da_warns_on_rank_deficient_statistics(two, tmp_path):
    from ailora_tools.errors import AiloraWarning

    data = tmp_path / "few.jsonl"
    letters = "abcdefghijklmnopqrst"
    data.write_text(
        "".join(json.dumps({"text": "".join(letters[(i * 7 + j) % 20] for j in range(12))}) + "\n" for i in range(16))
    )
    with pytest.warns(AiloraWarning, match=r"input statistics of .* have rank \d+ of 128 .* more and more varied"):
        decompose(two["A"]["original"], tmp_path / "o", method="lora-da", data=data, samples=16, rank=4, progress=False)
    modules = json.loads((tmp_path / "o" / "ailora.json").read_text())["modules"]
    assert min(s["input_rank"] for s in modules.values()) < 128


def test_convert_for_a_server_checks_the_base_it_is_given(two, tmp_path):
    """`convert --trained T --for vllm --base B`: B must be T's original model (not another of equal shapes, not the
    residual); the DoRA conversions take no --for (convert first, then export)."""
    for x in MODELS:
        base = two[x]["original"]
        res = cli("convert", "--trained", two["A"]["trained"], "-o", tmp_path / x, "--for", "vllm", "--base", base)
        if x == "A":
            assert res.exit_code == 0, res.output
        else:
            one_line_error(res, str(base), str(two["A"]["original"].absolute()))
            assert not (tmp_path / x).exists()
    one_line_error(
        cli(
            "convert",
            "--trained",
            two["A"]["trained"],
            "-o",
            tmp_path / "r",
            "--for",
            "vllm",
            "--base",
            two["A"]["residual"],
        ),
        "residual",
    )
    one_line_error(
        cli("convert", "--trained", two["A"]["trained"], "-o", tmp_path / "d", "--dora", "exact", "--for", "vllm"),
        "--dora exact: not with --for",
    )


def test_a_forced_training_belongs_to_the_base_it_was_trained_on(two, tmp_path):
    """Trained on B's residual with A's adapter (--force), the output records B's residual alone: the original and
    residual of A's decomposition say nothing about it."""
    data = tmp_path / "d.jsonl"
    data.write_text(rows(4))
    train(
        two["B"]["residual"],
        two["A"]["initial"],
        data,
        tmp_path / "t",
        max_steps=1,
        batch_size=2,
        progress=False,
        force=True,
    )
    block = json.loads((tmp_path / "t" / "ailora-train.json").read_text())["applies_to"]
    assert block["kind"] == "residual" and block["model"] == str(two["B"]["residual"])
    assert block["original"]["model"] is None and not block["original"]["samples"]
