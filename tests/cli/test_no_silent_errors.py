"""No silent errors: a run that exits 0 is right, or it does not exit 0 (each way a run could go wrong quietly)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import build_model, cli, one_line_error, train_args
from helpers.processes import CLI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from ailora_tools.errors import TargetError
from ailora_tools.io.checkpoint import Checkpoint
from ailora_tools.io.peft_adapter import read_adapter, write_adapter
from ailora_tools.manifests import check_base

ROOT = Path(__file__).parents[2]


def complete_looking(out: Path) -> bool:
    return any(
        (out / m).is_file()
        for m in ("ailora.json", "ailora-train.json", "ailora-convert.json", "ailora-merge.json", "adapter_config.json")
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny Llama with a tokenizer, its ailora decomposition, and a 'trained' adapter (B moved a little)."""
    from ailora_tools.decomposition import decompose
    from ailora_tools.demo import build_tiny_model

    root = tmp_path_factory.mktemp("silent")
    base = build_tiny_model(root / "base")
    decompose(base, root / "dec", rank=4, progress=False)
    init = read_adapter(root / "dec" / "adapter")
    moved = {m: (A, B + 0.01) for m, (A, B) in init.factors.items()}
    write_adapter(root / "trained", init.config, moved)
    (root / "trained" / "ailora-train.json").write_text(json.dumps({"initial_adapter": str(root / "dec" / "adapter")}))
    data = root / "data.jsonl"
    data.write_text(
        "\n".join(json.dumps({"prompt": f"Q: {i} + 1 = ?\nA: ", "completion": str(i + 1)}) for i in range(8)) + "\n"
    )
    return {"root": root, "base": base, "dec": root / "dec", "trained": root / "trained", "data": data}


# 1. --alpha 0 wrote NaN everywhere and exited 0
@pytest.mark.parametrize("alpha", ["0", "-2", "nan", "inf"])
def test_alpha_must_be_positive(work, tmp_path, alpha):
    res = cli("decompose", work["base"], "-o", tmp_path / "o", "--alpha", alpha)
    one_line_error(res, "--alpha")
    assert not (tmp_path / "o").exists()


# 2. a residual-relative adapter met the original base
def test_residual_adapter_on_the_original_is_refused(work, tmp_path):
    dec, base = work["dec"], work["base"]
    res = cli("train", "--base", base, "--adapter", dec / "adapter", "--data", work["data"], "-o", tmp_path / "t")
    one_line_error(res, "applies to the residual", "is the original model")
    assert not complete_looking(tmp_path / "t")
    one_line_error(cli("merge", base, work["trained"], "-o", tmp_path / "m"), "applies to the residual")
    assert not complete_looking(tmp_path / "m")
    one_line_error(cli("export-gguf", work["trained"], "--base", base, "-o", tmp_path / "x.gguf"), "convert")
    assert not (tmp_path / "x.gguf").exists()
    res = cli("check", work["trained"], "--for", "vllm")
    assert res.exit_code == 1 and "[base]" in res.output and "convert" in res.output


def test_the_residual_is_recognised_wherever_it_moved(work, tmp_path):
    moved = shutil.copytree(work["dec"] / "residual", tmp_path / "elsewhere")
    check_base(work["trained"], Checkpoint.open(moved))  # the residual: accepted
    with pytest.raises(TargetError, match="is the original model"):
        check_base(work["trained"], Checkpoint.open(work["base"]))


# 3. no token carrying loss gave NaN every step
@pytest.mark.parametrize(
    "row,why",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"text": ""}, "empty text"),
        ({"prompt": "x" * 40, "completion": "y"}, "--max-length 16"),
    ],
)
def test_rows_without_loss_tokens_fail_before_training(work, tmp_path, row, why):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(row) + "\n")
    res = cli(
        *train_args(work["dec"], data, tmp_path / "t"),
        "--max-length",
        "16",
    )
    one_line_error(res, f"{data}:2: no token carries loss", why)
    assert not (tmp_path / "t").exists()


def test_non_finite_loss_stops_training(work, tmp_path):
    init = read_adapter(work["dec"] / "adapter")
    write_adapter(tmp_path / "huge", init.config, {m: (A * 1e30, B * 1e30) for m, (A, B) in init.factors.items()})
    res = cli(
        "train",
        "--base",
        work["dec"] / "residual",
        "--adapter",
        tmp_path / "huge",
        "--data",
        work["data"],
        "-o",
        tmp_path / "t",
        "--max-steps",
        "3",
        "--quiet",
    )
    one_line_error(res, "step 1: the training loss is")
    assert not complete_looking(tmp_path / "t")
    metrics = tmp_path / "t" / "metrics.jsonl"
    assert not metrics.exists() or all(json.loads(line) for line in metrics.read_text().splitlines())


# 4. convert --max-rank 0, and check --for peft really loads with PEFT
def test_convert_max_rank_zero_is_refused(work, tmp_path):
    one_line_error(
        cli("convert", "--trained", work["trained"], "-o", tmp_path / "l", "--max-rank", "0"), "--max-rank 0"
    )
    assert not (tmp_path / "l").exists()


def test_check_for_peft_loads_with_peft(work, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = work["root"] / "lora-std"
    if not lora.exists():
        assert cli("convert", "--trained", work["trained"], "-o", lora).exit_code == 0
    assert cli("check", lora, "--for", "peft").exit_code == 0
    bad = shutil.copytree(lora, tmp_path / "r0")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 0}))
    res = cli("check", bad, "--for", "peft")
    assert res.exit_code == 1 and "PEFT cannot load it" in res.output
    wrong = shutil.copytree(lora, tmp_path / "wrong")
    (wrong / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["k_proj"]}))
    res = cli("check", wrong, "--for", "peft")
    assert res.exit_code == 1 and "[load]" in res.output
    model = AutoModelForCausalLM.from_pretrained(work["base"])
    dora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    res = cli("check", tmp_path / "dora", "--for", "peft", "--base", work["base"])
    assert res.exit_code == 0, res.output
    res = cli("check", tmp_path / "dora", "--for", "vllm")
    assert res.exit_code == 1 and "ailora-tools merge" in res.output and "--dora exact" in res.output


# 5. relative paths in base_model_name_or_path
def test_base_paths_are_absolute(work, tmp_path, monkeypatch):
    shutil.copytree(work["base"], tmp_path / "models" / "llama")
    monkeypatch.chdir(tmp_path)
    assert cli("decompose", "models/llama", "-o", "plain", "--method", "lora", "--rank", "4").exit_code == 0
    cfg = json.loads((tmp_path / "plain" / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "models" / "llama")
    res = cli("convert", "--trained", work["trained"], "-o", "conv", "--base", "models/llama")
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "conv" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "models" / "llama")
    card = cli("push", "conv", "--repo-id", "me/x", "--dry-run").output
    assert "huggingface.co/" not in card.split("## Use")[0] and str(tmp_path / "models" / "llama") in card, card


# 6. subfolders (sentence-transformers' 1_Pooling/) were not copied
def test_subfolders_are_copied(tmp_path):
    bert = build_model("bert", tmp_path / "minilm")
    (bert / "1_Pooling").mkdir()
    (bert / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (bert / "modules.json").write_text("[]")
    (bert / ".cache").mkdir()
    (bert / ".cache" / "junk").write_text("x")
    assert cli("decompose", bert, "-o", tmp_path / "d", "--rank", "4", "--svd", "exact").exit_code == 0
    for out in (tmp_path / "d" / "residual",):
        assert (out / "1_Pooling" / "config.json").read_text() == '{"pooling_mode_mean_tokens": true}'
        assert not (out / ".cache").exists()
    manifest = json.loads((tmp_path / "d" / "ailora.json").read_text())
    assert "residual/1_Pooling/config.json" in manifest["files"]["output"]
    assert "1_Pooling/config.json" in manifest["files"]["source"] and "config.json" in manifest["files"]["source"]


# 7. merge --dtype cast only the merged tensors and left config.json as it was
def test_merge_dtype_casts_every_float_tensor(work, tmp_path):
    from transformers import AutoModelForCausalLM

    res = cli("merge", work["dec"] / "residual", work["trained"], "-o", tmp_path / "m", "--dtype", "bfloat16")
    assert res.exit_code == 0, res.output
    dtypes = set()
    for shard in (tmp_path / "m").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "float32" not in {cfg.get("torch_dtype"), cfg.get("dtype")} and "bfloat16" in cfg.values()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="auto").dtype == torch.bfloat16
    assert cli("verify", tmp_path / "m").exit_code == 0


# 8. model cards
def test_model_cards_say_what_the_adapter_is(work, tmp_path):
    lora = work["root"] / "lora-std"
    if not lora.exists():
        assert cli("convert", "--trained", work["trained"], "-o", lora).exit_code == 0
    card = cli("push", lora, "--repo-id", "me/tiny-ailora", "--dry-run").output
    assert "**ailora**" in card and "REPO_ID" not in card and '"me/tiny-ailora"' in card
    front = card.split("---")[1]
    assert front.count("- lora\n") == 1 and "- ailora" in front
    card = cli("push", work["dec"], "--repo-id", "me/dec", "--dry-run").output
    assert "rank: 4" in card and "None" not in card and "q_proj" in card and "applies to the residual" in card
    plain = tmp_path / "plain"
    assert cli("decompose", work["base"], "-o", plain, "--method", "lora", "--rank", "4").exit_code == 0
    front = cli("push", plain, "--repo-id", "me/p", "--dry-run").output.split("---")[1]
    assert front.count("- lora\n") == 1


# 9. numbers out of range: exit 1, one line naming the option, nothing complete-looking
BAD_NUMBERS = {
    "decompose": [
        ("--rank", "0"),
        ("--rank", "-3"),
        ("--alpha", "0"),
        ("--alpha", "-1"),
        ("--niter", "-1"),
        ("--oversample", "-2"),
    ],
    "train": [
        ("--max-steps", "0"),
        ("--max-steps", "-5"),
        ("--epochs", "0"),
        ("--batch-size", "0"),
        ("--grad-accum", "0"),
        ("--lr", "0"),
        ("--lr", "-1e-4"),
        ("--max-length", "0"),
        ("--warmup", "-1"),
        ("--save-every", "0"),
        ("--eval-every", "0"),
    ],
    "convert": [("--max-rank", "0"), ("--max-rank", "-1"), ("--tolerance", "-0.5")],
}


def command(kind, work, out):
    if kind == "decompose":
        return ["decompose", work["base"], "-o", out]
    if kind == "train":
        return [
            *train_args(work["dec"], work["data"], out),
        ]
    return ["convert", "--trained", work["trained"], "-o", out]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    case=st.sampled_from([(k, f, v) for k, opts in BAD_NUMBERS.items() for f, v in opts]),
    scale=st.sampled_from([1, 7, 1000]),
)
def test_invalid_numbers_are_refused(work, tmp_path, case, scale):
    kind, flag, value = case
    value = (
        value if value in ("0",) else str(float(value) * scale if "." in value or "e" in value else int(value) * scale)
    )
    out = tmp_path / f"o-{kind}-{flag}-{value}"
    res = cli(*command(kind, work, out), flag, value)
    one_line_error(res, flag)
    assert not complete_looking(out)


@pytest.mark.slow
def test_data_errors_come_before_the_model_loads(work, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txet": "typo"}\n')
    code = (
        "import sys\nfrom ailora_tools.training.trainer import train\ntry:\n"
        f"    train({str(work['dec'] / 'residual')!r}, {str(work['dec'] / 'adapter')!r}, {str(bad)!r}, 'o')\n"
        "except Exception as e:\n    print(e, 'peft' in sys.modules, 'transformers' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert f"{bad}:2: expected" in res.stdout and res.stdout.strip().endswith("False False"), res.stdout + res.stderr


# 10. smaller items
def test_convert_of_plain_lora_keeps_its_rank(work, tmp_path):
    assert cli("decompose", work["base"], "-o", tmp_path / "d", "--method", "lora", "--rank", "4").exit_code == 0
    init = read_adapter(tmp_path / "d" / "adapter")
    write_adapter(tmp_path / "t", init.config, {m: (A, B + 0.01) for m, (A, B) in init.factors.items()})
    res = cli("convert", "--trained", tmp_path / "t", "--initial", tmp_path / "d" / "adapter", "-o", tmp_path / "l")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "l" / "adapter_config.json").read_text())["r"] == 4
    conv = read_adapter(tmp_path / "l")
    for m, (A, B) in conv.factors.items():
        want = init.scale(m) * (init.factors[m][1] + 0.01) @ init.factors[m][0]
        torch.testing.assert_close(conv.scale(m) * B @ A, want)


@pytest.mark.slow
def test_broken_pipe_is_quiet(work, tmp_path):
    proc = subprocess.Popen(
        [*CLI, "decompose", str(work["base"]), "-o", str(tmp_path / "o"), "--rank", "4", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.read(1)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 0 and "Broken pipe" not in err and "error" not in err, err
    assert (tmp_path / "o" / "ailora.json").is_file()


@pytest.mark.slow
def test_quiet_is_quiet(work, tmp_path):
    res = subprocess.run(
        [*CLI, *train_args(work["dec"], work["data"], tmp_path / "t"), "--max-steps", "1", "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert res.returncode == 0 and res.stderr == "", res.stderr


def test_bars_are_throttled_when_stderr_is_not_a_terminal(monkeypatch):
    from ailora_tools.console import progress_enabled

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    assert progress_enabled(False) and not progress_enabled(True)
    assert os.environ["TQDM_MININTERVAL"] == "30"  # pytest's stderr is not a terminal


@pytest.mark.slow
def test_usage_errors_are_one_line(work, tmp_path):
    one_line_error(cli("decompose", work["base"]), "Missing option '-o'", "--help")
    one_line_error(cli("decompose", work["base"], "-o", tmp_path / "o", "--rank", "many"), "--rank")
    one_line_error(cli("frobnicate"), "No such command")
    res = subprocess.run([*CLI, "merge"], capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and res.stdout == ""


@pytest.mark.slow
def test_unreachable_hub_names_the_real_cause(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_HUB_CACHE=str(tmp_path / "cache"),
        HF_HUB_ETAG_TIMEOUT="2",
        HF_HUB_DOWNLOAD_TIMEOUT="2",
    )
    res = subprocess.run(
        [*CLI, "decompose", "acme/absent", "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 1 and "HF_HUB_OFFLINE" not in res.stderr and "Connect" in res.stderr, res.stderr
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_text("x")
    res = subprocess.run(
        [*CLI, "push", str(tmp_path / "d"), "--repo-id", "me/x"],
        capture_output=True,
        text=True,
        env={**env, "HF_TOKEN": "hf_dummy"},
    )
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "could not be reached" in res.stderr, res.stderr


def test_revision_with_a_local_directory_is_refused(work, tmp_path):
    one_line_error(
        cli("decompose", work["base"], "-o", tmp_path / "o", "--revision", "v2"), "--revision v2", "Hub ids only"
    )


def test_verify_and_check_on_what_they_were_given(work, tmp_path):
    demo_like = tmp_path / "demo"
    demo_like.mkdir()
    shutil.copytree(work["dec"], demo_like / "decomposed")
    shutil.copytree(work["root"] / "lora-std", demo_like / "lora") if (work["root"] / "lora-std").exists() else None
    res = cli("verify", demo_like)
    assert res.exit_code == 0 and "decomposed" in res.output and "--resume" not in res.output, res.output
    (tmp_path / "empty").mkdir()
    res = cli("verify", tmp_path / "empty")
    assert res.exit_code == 1 and "--resume" not in res.output and "not an ailora-tools output" in res.output
    one_line_error(cli("check", tmp_path / "nowhere"), "no such adapter directory")
    res = cli("check", work["trained"], "--for", "vllm", "--json")
    report = json.loads(res.output)
    assert res.exit_code == 1 and not report["passes"] and report["findings"][0]["rule"]
    res = cli("push", work["trained"], "--repo-id", "me/x", "--dry-run", "--json")
    assert res.exit_code == 0 and json.loads(res.output)["dry_run"] is True


def test_demo_output_is_ignored_by_git():
    assert "/ailora-demo/" in (ROOT / ".gitignore").read_text().split()
