"""Serving what was trained on an NF4-quantised residual: the base re-quantised for vLLM (compressed-tensors W4A16)
and llama.cpp (GGUF Q4_0/Q8_0), convert and merge, each with its error against dequant(Q) + s·B·A measured."""

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import cli
from helpers.adapters import QUANTIZED_TARGETS as TARGETS
from transformers import AutoModelForCausalLM

from ailora_tools import convert, decompose, merge
from ailora_tools.adapters.nf4_residual import read_dequantized
from ailora_tools.adapters.server_base import export_base
from ailora_tools.io.checkpoint import Checkpoint

bnb = pytest.importorskip("bitsandbytes.functional")
IDS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))


def test_fixture_is_what_transformers_loads_as_nf4(run):
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(run / "dec" / "residual", dtype=torch.float32)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        nf4 = PeftModel.from_pretrained(model, run / "trained").eval()(input_ids=IDS).logits
    assert rel(nf4, trained_logits(run, IDS)) < 1e-2  # bitsandbytes' CPU kernel computes in lower precision


def trained_logits(run, ids):
    """The trained model in float32: the original architecture with the residual's weights (NF4 ones dequantised by
    bitsandbytes) plus the adapter (PEFT). transformers' own NF4 forward agrees up to its CPU kernel's precision."""
    from peft import PeftModel

    res = Checkpoint.open(run / "dec" / "residual")
    model = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
    state = model.state_dict()
    model.load_state_dict({n: read_dequantized(res, n) if n in res.tensors else state[n] for n in state})
    with torch.no_grad():
        return PeftModel.from_pretrained(model, run / "trained").eval()(input_ids=ids).logits


def readme_w4a16_logits(out: Path) -> torch.Tensor:
    """Run the serving guide's recipe for the vLLM base and its adapter in PEFT, as written (paths pointed at `out`)."""
    readme = (Path(__file__).parents[2] / "docs" / "guides" / "serving.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "CompressedTensorsConfig" in b)
    scope = {}
    exec(textwrap.dedent(block).replace('"served-vllm/', f'"{out}/'), scope)
    with torch.no_grad():
        return scope["model"].eval()(input_ids=IDS).logits


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_export_base_vllm_w4a16_loads_in_transformers_and_serves_the_trained_model(run, tmp_path):
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    s = export_base(run / "dec" / "residual", tmp_path / "out", server="vllm", adapter=run / "trained", progress=False)
    out = tmp_path / "out"
    q = json.loads((out / "base" / "config.json").read_text())["quantization_config"]
    assert (q["quant_method"], q["format"], q["config_groups"]["group_0"]["weights"]["group_size"]) == (
        "compressed-tensors",
        "pack-quantized",
        128,
    )
    assert "lm_head" in q["ignore"] and not any("q_proj" in n or "k_proj" in n for n in q["ignore"])
    assert s["quantized_from_float"] == [f"model.layers.{i}.self_attn.k_proj" for i in (0, 1)]  # fused with q/v
    # the file's values, decompressed by compressed-tensors, are the recorded error away from dequant_nf4
    base, res = Checkpoint.open(out / "base"), Checkpoint.open(run / "dec" / "residual")
    assert not any(n.endswith(".absmax") for n in base.tensors)
    scheme = preset_name_to_scheme("W4A16", ["Linear"])
    for m, err in s["errors"].items():
        sd = {
            k: read_dequantized(base, f"{m}.{k}") if k == "weight_scale" else read_tensor_of(base, f"{m}.{k}")
            for k in ("weight_packed", "weight_scale", "weight_shape")
        }
        W = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
        ref = read_dequantized(res, f"{m}.weight")
        assert abs(float((W - ref).norm() / ref.norm()) - err) < 1e-6 and 0.02 < err < 0.2
    # served (W4A16 base as transformers loads it + the exported adapter) vs trained (NF4 residual + adapter)
    served = readme_w4a16_logits(out)  # the README's way: PEFT on the base transformers loads, dequantised
    trained = trained_logits(run, IDS)
    assert s["worst_rel_fro_error"] / 10 < rel(served, trained) <= 2 * s["worst_rel_fro_error"]
    assert (out / "ailora-export-base.json").is_file() and s["adapter_rank"] == 8


def read_tensor_of(ckpt, name):
    from ailora_tools.io.tensorio import read_tensor

    return read_tensor(ckpt.shard(ckpt.tensors[name].file), name)


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_export_base_llama_cpp_gguf_reads_back(run, tmp_path, fmt):
    import gguf

    from ailora_tools.adapters.gguf_export import permute_rows

    s = export_base(
        run / "dec" / "residual", tmp_path / "out", server="llama.cpp", fmt=fmt, adapter=run / "trained", progress=False
    )
    reader = gguf.GGUFReader(tmp_path / "out" / "base.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.rope.dimension_count"] == 32
    assert fields["tokenizer.ggml.model"] == "llama" and len(fields["tokenizer.ggml.tokens"]) == 128
    assert fields["tokenizer.ggml.tokens"][100] == "[PAD100]" and fields["tokenizer.ggml.eos_token_id"] == 2
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 9 + 3  # per block: 2 norms, 7 matrices; embedding, output norm, output
    res = Checkpoint.open(run / "dec" / "residual")
    want = {"q4_0": (gguf.GGMLQuantizationType.Q4_0, 0.06, 0.12), "q8_0": (gguf.GGMLQuantizationType.Q8_0, 0.002, 0.01)}
    qtype, low, high = want[fmt]
    served = {}
    for i in (0, 1):
        for short, hf, heads in (
            ("attn_q", "q_proj", (4, None)),
            ("attn_v", "v_proj", None),
            ("attn_k", "k_proj", (4, 2)),
        ):
            t = tensors[f"blk.{i}.{short}.weight"]
            W = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(
                [int(d) for d in reversed(t.shape)]
            )
            ref = read_dequantized(res, f"model.layers.{i}.self_attn.{hf}.weight")
            if heads:
                ref = permute_rows(ref, *heads)  # llama.cpp's q/k row order
            if hf == "k_proj":  # float in the residual: stored as it is
                assert t.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(W, ref)
                continue
            assert t.tensor_type == qtype
            err = s["errors"][f"model.layers.{i}.self_attn.{hf}"]
            assert abs(float((W - ref).norm() / ref.norm()) - err) < 1e-6 and low < err < high
            served[f"model.layers.{i}.self_attn.{hf}.weight"] = unpermute(W, heads[0]) if heads else W
    # served (the GGUF's values, back in HF order, + the adapter) vs trained, within the printed error's reach
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
    state = model.state_dict()
    model.load_state_dict({n: served.get(n, read_dequantized(res, n) if n in res.tensors else state[n]) for n in state})
    with torch.no_grad():
        got = PeftModel.from_pretrained(model, run / "trained").eval()(input_ids=IDS).logits
    assert s["worst_rel_fro_error"] / 10 < rel(got, trained_logits(run, IDS)) <= 2 * s["worst_rel_fro_error"]
    lora = gguf.GGUFReader(tmp_path / "out" / "adapter.gguf")
    assert {t.name for t in lora.tensors} == {
        f"blk.{i}.attn_{x}.weight.lora_{y}" for i in (0, 1) for x in "qv" for y in "ab"
    }


def unpermute(w, n_head):
    """The inverse of llama.cpp's q/k row permutation (`gguf_export.permute_rows`)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_export_base_refuses_a_float_residual(tiny, tmp_path):
    decompose(tiny("llama"), tmp_path / "dec", rank=4, progress=False)
    res = cli("export-base", str(tmp_path / "dec" / "residual"), "--for", "vllm", "-o", str(tmp_path / "o"))
    assert res.exit_code == 1 and "not NF4-quantised" in res.output and not (tmp_path / "o").exists()


def test_convert_and_merge_measure_against_the_trained_model(run, tmp_path):
    dec = run / "dec"
    c = convert(run / "trained", tmp_path / "lora")
    assert set(c["trained_errors"]) == {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in TARGETS}
    assert 0.01 < c["worst_trained_rel_fro_error"] < 0.2  # the quantisation error: no LoRA of rank 2r removes it
    onto_residual = merge(dec / "residual", run / "trained", tmp_path / "m_res", progress=False)
    assert onto_residual["worst_trained_rel_fro_error"] < 1e-6  # float32 merge of the dequantised residual: exact
    onto_original = merge(run / "model", tmp_path / "lora", tmp_path / "m_orig", progress=False)
    for m, e in onto_original["trained_errors"].items():
        assert abs(e - c["trained_errors"][m]) < 1e-5
    trained = trained_logits(run, IDS)
    with torch.no_grad():
        m_res = AutoModelForCausalLM.from_pretrained(tmp_path / "m_res", dtype=torch.float32)(input_ids=IDS).logits
        m_orig = AutoModelForCausalLM.from_pretrained(tmp_path / "m_orig", dtype=torch.float32)(input_ids=IDS).logits
    assert rel(m_res, trained) < 1e-5
    # the printed weight error gives the logits' order of magnitude (four matrices' errors add up)
    assert c["worst_trained_rel_fro_error"] / 10 < rel(m_orig, trained) <= 2 * c["worst_trained_rel_fro_error"]
    cfg = json.loads((tmp_path / "m_res" / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert json.loads((tmp_path / "m_res" / "ailora-merge.json").read_text())["summary"]["trained_errors"]


def test_cli_prints_the_errors(run, tmp_path):
    res = cli(
        "export-base",
        str(run / "dec" / "residual"),
        "--for",
        "llama.cpp",
        "--adapter",
        str(run / "trained"),
        "-o",
        str(tmp_path / "g"),
        "--quiet",
    )
    assert res.exit_code == 0, res.output
    assert "model.layers.0.self_attn.q_proj" in res.output and "llama-server -m" in res.output
    res = cli("convert", "--trained", str(run / "trained"), "-o", str(tmp_path / "lora"))
    assert res.exit_code == 0 and "W_trained = dequant(Q) + s·B·A" in res.output, res.output
