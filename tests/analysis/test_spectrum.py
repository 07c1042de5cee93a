"""`spectrum`: singular values against a float64 SVD, ‖ΔW‖_F against dense products, streaming, plots, CLI."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from helpers import expected_digest
from matplotlib.image import imread
from safetensors import safe_open
from safetensors.torch import load_file

from ailora_tools import decompose, spectrum
from ailora_tools.adapters.conversion import convert
from ailora_tools.analysis import spectra as spectra_module
from ailora_tools.cli import main
from ailora_tools.errors import NumericsError, TargetError
from ailora_tools.io import tensorio
from ailora_tools.io.peft_adapter import read_adapter, write_adapter
from ailora_tools.manifests import TRAIN_MANIFEST
from ailora_tools.verify import verify


def weights(path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as g:
            out.update({k: g.get_tensor(k) for k in g.keys()})
    return out


def assert_png(path):
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert float(img[..., :3].std()) > 0.05  # something is drawn


def test_spectra_match_a_float64_svd_and_only_targets_are_read(tiny, tmp_path, monkeypatch):
    src = tiny("llama")
    read = []
    real = tensorio.read_tensor
    monkeypatch.setattr(spectra_module, "read_tensor", lambda h, name, fd=None: read.append(name) or real(h, name, fd))
    s = spectrum(src, tmp_path / "s", rank=4, progress=False)
    out = tmp_path / "s"
    manifest = json.loads((out / "spectrum.json").read_text())
    rows = manifest["modules"]
    assert [(r["layer"], r["target"]) for r in rows] == [(0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "v_proj")]
    assert sorted(read) == sorted(r["module"] + ".weight" for r in rows)  # one matrix at a time, nothing else
    W = weights(src)
    spectra = load_file(str(out / "spectra.safetensors"))
    for r in rows:
        w = W[r["module"] + ".weight"].double()
        ref = torch.linalg.svdvals(w)
        n = ref.numel()
        assert spectra[r["module"]].shape == (n,) and r["shape"] == list(w.shape)
        torch.testing.assert_close(spectra[r["module"]], ref, atol=1e-9 * float(ref[0]), rtol=0)
        fro2 = float(w.square().sum())
        assert r["sigma_max"] == pytest.approx(float(ref[0]), rel=1e-12)
        assert r["sigma_top_edge"] == pytest.approx(float(ref[3]), rel=1e-9)
        assert r["sigma_bottom_edge"] == pytest.approx(float(ref[n - 4]), rel=1e-9)
        assert r["energy_top"] == pytest.approx(float(ref[:4].square().sum()) / fro2, rel=1e-9)
        assert r["energy_bottom"] == pytest.approx(float(ref[-4:].square().sum()) / fro2, rel=1e-6)
        assert r["fro_norm"] == pytest.approx(math.sqrt(fro2), rel=1e-12) and r["unresolved"] == 0
    assert s["q_proj_mean_energy_top"] == pytest.approx((rows[0]["energy_top"] + rows[2]["energy_top"]) / 2)
    assert manifest["plots"] == ["spectra.png", "layers.png"] and not (out / "delta.png").exists()
    for name in manifest["plots"]:
        assert_png(out / name)
    for rel, digest in manifest["files"]["output"].items():
        assert digest == expected_digest(out / rel)
    assert verify(out)["problems"] == [] and verify(out)["files_checked"] == 3


def test_delta_norms_against_dense_products(tiny, tmp_path):
    src = tiny("llama")
    decompose(src, tmp_path / "dec", rank=4, alpha=8, progress=False)
    initial = read_adapter(tmp_path / "dec" / "adapter")
    torch.manual_seed(1)
    moved = {
        m: (A + 0.05 * torch.randn_like(A), B + 0.05 * torch.randn_like(B)) for m, (A, B) in initial.factors.items()
    }
    trained = tmp_path / "trained"
    write_adapter(trained, initial.config, moved)  # a "trained" adapter, named by a training manifest as train writes
    (trained / TRAIN_MANIFEST).write_text(json.dumps({"initial_adapter": str(tmp_path / "dec" / "adapter")}))
    spectrum(src, tmp_path / "s", rank=4, adapter=trained, progress=False)
    manifest = json.loads((tmp_path / "s" / "spectrum.json").read_text())
    assert manifest["adapter"]["initial"] == str(tmp_path / "dec" / "adapter")
    W = weights(src)
    s = initial.scale("model.layers.0.self_attn.q_proj")
    assert s == 2.0
    by_module = {r["module"]: r for r in manifest["adapter"]["modules"]}
    assert sorted(by_module) == sorted(initial.factors)
    for m, (A, B) in moved.items():
        A0, B0 = initial.factors[m]
        dense = s * (B.double() @ A.double() - B0.double() @ A0.double())
        assert by_module[m]["delta_fro"] == pytest.approx(float(dense.norm()), rel=1e-10)
        assert by_module[m]["delta_rel"] == pytest.approx(
            float(dense.norm() / W[m + ".weight"].double().norm()), rel=1e-10
        )
    assert_png(tmp_path / "s" / "delta.png")
    # the same update as a standard rank-2r LoRA on the original base (convert's output): ΔW = s'·B'A'
    convert(trained, tmp_path / "lora")
    spectrum(src, tmp_path / "s2", rank=4, adapter=tmp_path / "lora", progress=False)
    again = json.loads((tmp_path / "s2" / "spectrum.json").read_text())["adapter"]
    assert again["initial"] is None
    for r in again["modules"]:
        assert r["delta_fro"] == pytest.approx(by_module[r["module"]]["delta_fro"], rel=1e-6)


def test_bad_input_writes_nothing(tiny, tmp_path):
    src = tiny("llama")
    with pytest.raises(NumericsError, match=r"--rank 32: 'model.layers.0.self_attn.v_proj.weight' is 32x64"):
        spectrum(src, tmp_path / "a", rank=32, progress=False)
    with pytest.raises(TargetError, match=r"^targets: 'w_proj' matches no module"):
        spectrum(src, tmp_path / "b", targets=["w_proj"], progress=False)
    decompose(src, tmp_path / "dec", rank=4, progress=False)
    other = tmp_path / "other"
    adapter = read_adapter(tmp_path / "dec" / "adapter")
    write_adapter(other, adapter.config, {m.replace("self_attn", "attn"): f for m, f in adapter.factors.items()})
    with pytest.raises(TargetError, match=r"adapts module 'model.layers.0.attn.q_proj' but the base"):
        spectrum(src, tmp_path / "c", rank=4, adapter=other, progress=False)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_bert_aliases_and_cli(tiny, tmp_path):
    res = CliRunner().invoke(main, ["spectrum", str(tiny("bert")), "-o", str(tmp_path / "s"), "--rank", "4", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["modules"] == 4 and {r["module"].rsplit(".", 1)[-1] for r in summary["rows"]} == {"query", "value"}
    rows = json.loads((tmp_path / "s" / "spectrum.json").read_text())["modules"]
    assert {r["target"] for r in rows} == {"q_proj", "v_proj"}  # as asked, resolved to BERT's query/value
    res = CliRunner().invoke(main, ["spectrum", str(tiny("bert")), "-o", str(tmp_path / "s"), "--rank", "4"])
    assert res.exit_code == 1 and res.output.startswith("error: -o ") and len(res.output.strip().splitlines()) == 1
