"""llama.cpp itself serves what export-gguf writes, for every architecture its converter handles.

Each family: a tiny random model with a tokenizer llama.cpp's converter reads, its base GGUF written by llama.cpp's own
convert_hf_to_gguf.py, a trained-like adapter (non-zero B, rsLoRA, a per-module alpha and rank), our export-gguf, and
llama.cpp's logits (llama-cpp-python built from its sdist, float32) against transformers + PEFT's. The bound is 20x
llama.cpp's own float32 floor: the larger of the base's and the trained model's (the LoRA merged, converted by
llama.cpp's converter), each without adapter against transformers. The llama.cpp environment is
`bash .ci/servers llama.cpp`'s; without it these tests fail with that recipe (they are marked `serve`).
"""

import json

import pytest
import torch
import transformers
from helpers.llama_cpp import FACTOR, FAMILIES, PROMPTS, build_bases, hf_logits, worst
from peft import PeftModel

from ailora_tools import export_gguf
from ailora_tools.adapters.gguf_export import LAYOUTS
from ailora_tools.servers import llama_cpp

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def bases(tmp_path_factory, python, request):
    """The Base of every family this run selects, with its trained-like LoRA and merged model, built once per module."""
    params = [getattr(item, "callspec", None) for item in request.session.items]
    chosen = {p.params["family"] for p in params if p is not None and "family" in p.params}
    families = {name: fam for name, fam in FAMILIES.items() if name in chosen}
    return build_bases(tmp_path_factory.mktemp("llama-cpp"), families, python, trained=True)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_serves_the_export_of_every_family(bases, python, family, tmp_path):
    """Served = trained within 20x llama.cpp's float32 floor: the larger of its difference to transformers on the base
    and on the trained model (its own converter on the LoRA merged: where llama.cpp approximates, e.g. GELU through an
    fp16 table, its error grows with the weights, so the base alone understates it). And served = llama.cpp's own
    conversion of the trained model within 20x the base's floor: the export adds no error of its own."""
    base = bases[family]
    export_gguf(base.lora, base.model, tmp_path / "lora.gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(base.model, dtype=torch.float32)
    want = hf_logits(PeftModel.from_pretrained(model, base.lora).eval())
    effect = worst(want, hf_logits(transformers.AutoModelForCausalLM.from_pretrained(base.model).eval()))
    got = llama_cpp.logits(base.gguf, PROMPTS, lora_gguf=tmp_path / "lora.gguf", python=python)
    floor = max(base.floor, base.trained_floor)
    diff, bound, own = worst(got, want), FACTOR * floor, worst(got, base.trained_logits)
    print(
        f"{family}: adapter {diff:.2e}, floor {base.floor:.2e} (base) {base.trained_floor:.2e} (trained), "
        f"ratio {diff / floor:.1f} ({diff / base.floor:.1f} to the base's), adapter effect {effect:.2e}, "
        f"to llama.cpp's own trained model {own:.2e}"
    )
    assert diff <= bound, f"{family}: llama.cpp is {diff:.3g} from transformers, floor {floor:.3g}"
    assert own <= FACTOR * base.floor, f"{family}: the export is {own:.3g} from llama.cpp's own trained model"
    assert effect > 10 * bound, f"{family}: the adapter moves the logits by {effect:.3g} only: the test cannot see it"


def test_layouts_are_the_converter_classes_of_llama_cpp(python):
    """gguf_export.LAYOUTS holds llama.cpp's rules: per model type, the class llama.cpp's convert_hf_to_gguf.py
    converts its transformers class with, that class's gguf MODEL_ARCH, and whether it permutes q/k."""
    import subprocess

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    hf = {mt: MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[mt] for mt in LAYOUTS}
    script = (
        "import json, sys; from conversion import get_model_class; "
        f"print(json.dumps({{mt: (c.__name__, c.model_arch.name, bool(getattr(c, 'undo_permute', False))) "
        f"for mt, c in ((mt, get_model_class(name)) for mt, name in {hf!r}.items())}}))"
    )
    src = llama_cpp.source_dir(python)
    done = subprocess.run([python, "-c", script], cwd=src, capture_output=True, text=True, timeout=300, check=True)
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    ours = {mt: [lay.converter, lay.arch, lay.permute_qk] for mt, lay in LAYOUTS.items()}
    assert ours == {mt: list(v) for mt, v in theirs.items()}
    assert set(FAMILIES) == set(LAYOUTS)  # every family the exporter claims is served in these tests
