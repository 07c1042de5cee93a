"""llama.cpp serves what the pipeline writes: `convert` outputs through export-gguf (rsLoRA AILoRA, f32 and q8_0),
`export-base --for llama.cpp` (Q8_0, Q4_0) with its adapter, and our merged model through llama.cpp's own converter.

Bounds: 20x llama.cpp's float32 floor on the base (the same model without adapter against transformers); a quantised
base within its format's floor (the same export with the initial adapter against the model it starts from).
"""

from pathlib import Path

import pytest
import torch
import transformers
from helpers.adapters import fake_training, quantize_residual
from helpers.llama_cpp import FACTOR, PROMPTS, SMALL, Family, build_bases, hf_logits, worst
from peft import PeftModel

from ailora_tools import convert, decompose, export_gguf, merge
from ailora_tools.adapters.nf4_residual import read_dequantized
from ailora_tools.adapters.server_base import export_base
from ailora_tools.io.checkpoint import Checkpoint
from ailora_tools.servers import llama_cpp

pytestmark = pytest.mark.serve
#: a plain Llama (export-base writes Llama hyper-parameters without rope scaling)
LLAMA = Family("LlamaConfig", SMALL, ("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory, python):
    return build_bases(tmp_path_factory.mktemp("llama-cpp"), {"llama": LLAMA}, python)["llama"]


def peft_logits(model_dir: Path, adapter: Path | None = None) -> list[torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return hf_logits(PeftModel.from_pretrained(model, adapter).eval() if adapter else model.eval())


def test_convert_outputs_served_f32_and_q8_0(llama, python, tmp_path):
    decompose(llama.model, tmp_path / "dec", rank=4, alpha=8, rslora=True, progress=False)
    fake_training(tmp_path / "dec" / "adapter", tmp_path / "trained", scale=0.1)
    convert(tmp_path / "trained", tmp_path / "lora", progress=False)
    want = peft_logits(tmp_path / "dec" / "residual", tmp_path / "trained")  # the trained model
    effect = worst(want, peft_logits(llama.model))
    got = {}
    for outtype in ("f32", "q8_0"):
        export_gguf(tmp_path / "lora", llama.model, tmp_path / f"{outtype}.gguf", outtype=outtype)
        got[outtype] = llama_cpp.logits(llama.gguf, PROMPTS, lora_gguf=tmp_path / f"{outtype}.gguf", python=python)
    f32, q8 = worst(got["f32"], want), worst(got["q8_0"], want)
    print(f"convert (ailora rsLoRA): f32 {f32:.2e}, q8_0 {q8:.2e}, floor {llama.floor:.2e}, effect {effect:.2e}")
    assert f32 <= FACTOR * llama.floor and effect > 10 * FACTOR * llama.floor
    assert q8 <= 0.02 * effect  # q8_0 rounds lora_a to 8 bits per block of 32


@pytest.fixture(scope="module")
def quantized(llama, tmp_path_factory):
    """PiSSA r4 on q/v with the residual's targets as NF4, and an adapter 'trained' on it."""
    root = tmp_path_factory.mktemp("nf4")
    decompose(llama.model, root / "dec", method="pissa", rank=4, alpha=8, targets=("q_proj", "v_proj"), progress=False)
    quantize_residual(root / "dec")
    fake_training(root / "dec" / "adapter", root / "trained", scale=0.1)
    return root


def nf4_logits(llama, root: Path, adapter: Path) -> list[torch.Tensor]:
    """The model trained on the NF4 residual, in float32: its weights dequantised, the adapter in PEFT."""
    res = Checkpoint.open(root / "dec" / "residual")
    model = transformers.AutoModelForCausalLM.from_pretrained(llama.model, dtype=torch.float32)
    state = model.state_dict()
    model.load_state_dict({n: read_dequantized(res, n) if n in res.tensors else state[n] for n in state})
    return hf_logits(PeftModel.from_pretrained(model, adapter).eval())


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_export_base_served_with_its_adapter(llama, quantized, python, fmt, tmp_path):
    diffs = {}
    for name, adapter in (("initial", quantized / "dec" / "adapter"), ("trained", quantized / "trained")):
        out = tmp_path / name
        export_base(quantized / "dec" / "residual", out, server="llama.cpp", fmt=fmt, adapter=adapter, progress=False)
        got = llama_cpp.logits(out / "base.gguf", PROMPTS, lora_gguf=out / "adapter.gguf", python=python)
        diffs[name] = worst(got, nf4_logits(llama, quantized, adapter))
    effect = worst(
        nf4_logits(llama, quantized, quantized / "trained"), nf4_logits(llama, quantized, quantized / "dec" / "adapter")
    )
    print(
        f"export-base {fmt}: trained {diffs['trained']:.2e}, format floor (initial) {diffs['initial']:.2e}, "
        f"effect {effect:.2e}"
    )
    assert diffs["trained"] <= 2 * diffs["initial"] and effect > 4 * diffs["initial"]


def test_llama_cpp_converts_our_merged_model(llama, python, tmp_path):
    decompose(llama.model, tmp_path / "dec", rank=4, alpha=8, rslora=True, progress=False)
    fake_training(tmp_path / "dec" / "adapter", tmp_path / "trained", scale=0.1)
    merge(tmp_path / "dec" / "residual", tmp_path / "trained", tmp_path / "merged", progress=False)
    if not (tmp_path / "merged" / "tokenizer.model").is_file():
        (tmp_path / "merged" / "tokenizer.model").write_bytes((llama.model / "tokenizer.model").read_bytes())
    gguf = llama_cpp.convert_base(tmp_path / "merged", tmp_path / "merged.gguf", python=python)
    diff = worst(llama_cpp.logits(gguf, PROMPTS, python=python), peft_logits(tmp_path / "merged"))
    print(f"merged: {diff:.2e}, floor {llama.floor:.2e}")
    assert diff <= FACTOR * llama.floor
