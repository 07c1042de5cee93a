"""decompose --quantize nf4 (QPiSSA, LoftQ), training on the NF4 residual, get_ailora_model(quantize="nf4")."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import build_model, cli, one_line_error, train_args
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ailora_tools import decompose, get_ailora_model
from ailora_tools.io.checkpoint import Checkpoint
from ailora_tools.io.nf4_layout import STATE
from ailora_tools.io.tensorio import read_tensor
from ailora_tools.quantization.nf4 import quantize, read_dequantized

pytest.importorskip("bitsandbytes")
import bitsandbytes as bnb  # noqa: E402

IDS = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model):
    # train mode: on CPUs with AVX512-BF16, bitsandbytes' eval-mode CPU path repacks the weights and computes in
    # bfloat16; in train mode it dequantises and multiplies in the model's dtype (no dropout in these models)
    model.train()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _by_hand(src, out: Path):
    """The original model with every target replaced by dequant(Q) + s·B·A, from the files' tensors."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    residual, adapter = Checkpoint.open(out / "residual"), load_file(out / "adapter" / "adapter_model.safetensors")
    scale = json.loads((out / "ailora.json").read_text())["scale"]
    with torch.no_grad():
        for module in json.loads((out / "ailora.json").read_text())["modules"]:
            A = adapter[f"base_model.model.{module}.lora_A.weight"]
            B = adapter[f"base_model.model.{module}.lora_B.weight"]
            model.get_submodule(module).weight.copy_(
                read_dequantized(residual, f"{module}.weight").float() + scale * B @ A
            )
    return model


@pytest.mark.parametrize("method,iters", [("ailora", 0), ("pissa", 2), ("lora", 1)])
def test_nf4_residual_loads_as_it_is_and_gives_the_hand_computed_logits(tmp_path, method, iters):
    from peft import PeftModel

    src = build_model("llama", tmp_path / "src")
    decompose(src, tmp_path / "out", method=method, rank=4, quantize="nf4", loftq_iters=iters, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "residual", dtype=torch.float32)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, bnb.nn.Linear4bit) and isinstance(attn.v_proj, bnb.nn.Linear4bit)
    assert type(attn.k_proj) is torch.nn.Linear and type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert attn.q_proj.weight.quant_state.nested  # double quantisation
    peft = PeftModel.from_pretrained(model, tmp_path / "out" / "adapter")
    torch.testing.assert_close(_logits(peft), _logits(_by_hand(src, tmp_path / "out")), atol=2e-5, rtol=0)
    original = _logits(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32))
    assert 1e-3 < float((_logits(peft) - original).abs().max()) < 0.2  # quantised: close, not equal
    manifest = json.loads((tmp_path / "out" / "ailora.json").read_text())
    assert manifest["quantize"] == {"type": "nf4", "all": False, "loftq_iters": iters, "double_quant": True}
    assert manifest["adapter_base"] == "residual"


def test_packed_bytes_are_bitsandbytes_own_and_sit_in_the_shard_and_index(tmp_path):
    src = build_model("llama", tmp_path / "src")
    decompose(src, tmp_path / "out", method="pissa", rank=4, quantize="nf4", progress=False)
    res = tmp_path / "out" / "residual"
    index = json.loads((res / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.self_attn.q_proj.weight"
    with safe_open(str(res / index[name]), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys() if k.startswith(name)}
    assert set(stored) == {
        name,
        *(f"{name}.{k}" for k in ("absmax", "quant_map", "nested_absmax", "nested_quant_map", STATE)),
    }
    assert all(index[k] == index[name] for k in stored)
    state = json.loads(bytes(stored[f"{name}.{STATE}"].numpy()))
    assert state["shape"] == [64, 64] and state["dtype"] == "float32" and state["quant_type"] == "nf4"
    W = load_file(next(p for p in Path(src).glob("*.safetensors") if name in load_file(p)))[name].double()
    adapter = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj"
    ours = quantize(
        W - adapter[f"{key}.lora_B.weight"].double() @ adapter[f"{key}.lora_A.weight"].double(), dtype="F32"
    )
    assert torch.equal(ours[""], stored[name]) and torch.equal(ours["absmax"], stored[f"{name}.absmax"])


def test_quantize_all_quantises_every_linear_weight_but_the_head(tmp_path):
    src = build_model("llama", tmp_path / "src")
    decompose(src, tmp_path / "out", rank=4, quantize="nf4", quantize_all=True, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "residual", dtype=torch.float32)
    linear = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linear.pop("lm_head") is torch.nn.Linear
    assert linear and all(t is bnb.nn.Linear4bit for t in linear.values())
    ckpt = Checkpoint.open(tmp_path / "out" / "residual")
    W = read_dequantized(ckpt, "model.layers.0.mlp.down_proj.weight")
    ref = read_dequantized(Checkpoint.open(src), "model.layers.0.mlp.down_proj.weight")
    assert W.shape == ref.shape and 0.05 < float((W - ref).norm() / ref.norm()) < 0.15  # plain NF4 of W


def test_error_falls_from_qlora_to_qpissa_to_loftq_and_the_command_prints_it(tmp_path):
    from ailora_tools.testing.synthetic import synthetic_llama

    src = synthetic_llama(tmp_path / "src", layers=2, hidden=128, inter=256, kv=2, vocab=256, shards=2)
    res = cli(
        "decompose",
        src,
        "-o",
        tmp_path / "out",
        *"--method pissa --rank 8 --quantize nf4 --loftq-iters 3 --quiet".split(),
    )
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.output.splitlines() if line.startswith("    ")]
    table = {r[0]: (float(r[1]), float(r[2])) for r in rows}
    assert list(table) == ["qlora", "pissa", "pissa+loftq3"]
    assert table["qlora"][0] > table["pissa"][0] > table["pissa+loftq3"][0]
    modules = json.loads((tmp_path / "out" / "ailora.json").read_text())["modules"]
    for stats in modules.values():
        steps = stats["loftq_rel_fro"]
        assert len(steps) == 4 and stats["quant_rel_fro"] == steps[-1] <= steps[0] < stats["qlora_rel_fro"]
        assert stats["recon_rel_fro"] == stats["quant_rel_fro"]


def test_ailora_keeps_minor_value_factors_and_alternates_only_the_query(tmp_path):
    src = build_model("llama", tmp_path / "src")
    decompose(src, tmp_path / "out", rank=4, quantize="nf4", loftq_iters=2, progress=False)
    modules = json.loads((tmp_path / "out" / "ailora.json").read_text())["modules"]
    for name, stats in modules.items():
        assert stats["loftq_iters"] == (2 if name.endswith("q_proj") else 0), name
        assert ("loftq_rel_fro" in stats) == name.endswith("q_proj")


def test_train_on_the_nf4_residual_on_cpu_loss_falls(tmp_path):
    from ailora_tools.demo import build_tiny_model

    base = build_tiny_model(tmp_path / "base")
    decompose(base, tmp_path / "dec", method="pissa", rank=4, quantize="nf4", progress=False)
    data = tmp_path / "data.jsonl"
    data.write_text(
        "\n".join(json.dumps({"prompt": f"Q: {i} + 1 = ?\nA: ", "completion": str(i + 1)}) for i in range(16)) + "\n"
    )
    res = cli(
        *train_args(tmp_path / "dec", data, tmp_path / "t"),
        *"--max-steps 12 --lr 3e-3 --device cpu --json".split(),
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{") :])
    assert summary["last_loss"] < summary["first_loss"] - 0.2, summary
    trained = load_file(tmp_path / "t" / "adapter_model.safetensors")
    initial = load_file(tmp_path / "dec" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    # the trained adapter belongs to the quantised residual: spectrum (float weights only) says so in one line
    one_line_error(
        cli("spectrum", tmp_path / "dec" / "residual", "--adapter", tmp_path / "t", "-o", tmp_path / "s"),
        "q_proj.weight' has dtype U8",
        "dequantize the checkpoint first",
    )
    # and train refuses the float residual of another run for it (identity through fingerprints of the packed bytes)
    decompose(base, tmp_path / "float", method="pissa", rank=4, progress=False)
    one_line_error(
        cli(
            "train",
            "--base",
            tmp_path / "float" / "residual",
            "--adapter",
            tmp_path / "dec" / "adapter",
            "--data",
            data,
            "-o",
            tmp_path / "t2",
            "--max-steps",
            "1",
        ),
        "applies to the residual",
    )


def test_train_loads_the_nf4_residual_float_weights_in_the_asked_dtype(tmp_path):
    # transformers keeps a pre-quantised checkpoint's float weights in their stored dtype whatever dtype is asked;
    # train casts them (float32 on CPU) as PEFT's prepare_model_for_kbit_training does, the packed bytes untouched
    from ailora_tools.training.tasks import TASKS, load_model

    src = build_model("llama", tmp_path / "src", dtype=torch.bfloat16)
    decompose(src, tmp_path / "dec", method="pissa", rank=4, quantize="nf4", quantize_all=True, progress=False)
    model, _, _ = load_model(
        TASKS["causal-lm"],
        tmp_path / "dec" / "residual",
        tmp_path / "dec" / "adapter",
        labels=None,
        dtype=torch.float32,
    )
    floats = {n: p.dtype for n, p in model.named_parameters() if p.is_floating_point()}
    assert floats and set(floats.values()) == {torch.float32}, floats
    q = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj.base_layer")
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.dtype == torch.uint8
    stored = Checkpoint.open(tmp_path / "dec" / "residual")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(q.weight.data.flatten(), read_tensor(stored.shard(stored.tensors[name].file), name).flatten())


def test_get_ailora_model_quantises_in_memory_as_decompose_writes(tmp_path):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    src = build_model("llama", tmp_path / "src")
    decompose(src, tmp_path / "out", method="pissa", rank=4, quantize="nf4", loftq_iters=1, progress=False)
    model = get_ailora_model(
        AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32),
        method="pissa",
        rank=4,
        quantize="nf4",
        loftq_iters=1,
        progress=False,
    )
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, LoraLinear4bit)
    torch.testing.assert_close(_logits(model), _logits(_by_hand(src, tmp_path / "out")), atol=2e-5, rtol=0)
    with pytest.raises(Exception, match="quantize nf4: not with dora"):
        get_ailora_model(AutoModelForCausalLM.from_pretrained(src), quantize="nf4", dora=True, progress=False)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--loftq-iters", "2"], "--loftq-iters"),
        (["--quantize-all"], "--quantize-all"),
        (["--quantize", "nf4", "--no-residual"], "--no-residual"),
        (["--quantize", "int3"], "--quantize"),
    ],
)
def test_quantize_options_are_checked_before_anything_is_written(tmp_path, args, needle):
    src = build_model("llama", tmp_path / "src")
    one_line_error(cli("decompose", src, "-o", tmp_path / "o", *args), needle)
    assert not (tmp_path / "o").exists()


def test_quantisation_modules_import_without_bitsandbytes():
    code = (
        "import sys, ailora_tools.quantization.nf4, ailora_tools.decomposition.quantized, ailora_tools.cli; "
        "assert 'bitsandbytes' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_quantised_decompose_peak_memory_is_flat_in_the_layer_count(tmp_path):
    """24 layers against 2, same matrices: the peak above the baseline stays within a few of the largest matrix
    (memprobe.py)."""
    from ailora_tools.testing.synthetic import synthetic_llama

    peaks = {}
    for layers in (2, 24):
        src = tmp_path / f"l{layers}"
        synthetic_llama(src, layers=layers, hidden=256, inter=4096, kv=2, vocab=8000, per_shard=2)
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "ailora_tools.testing.memprobe",
                str(src),
                str(tmp_path / f"o{layers}"),
                json.dumps({"method": "pissa", "quantize": "nf4", "quantize_all": True, "loftq_iters": 1}),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        probe = json.loads(out.stdout.strip().splitlines()[-1])
        peaks[layers] = probe["peak"] - probe["baseline"]
    matrix = 256 * 4096 * 8  # the largest quantised matrix, in float64
    assert peaks[24] <= peaks[2] + 4 * matrix, peaks
