"""llama.cpp itself serves what export-gguf writes, for every architecture its converter handles.

Each family: a tiny random model with a tokenizer llama.cpp's converter reads, its base GGUF written by llama.cpp's own
convert_hf_to_gguf.py, a trained-like adapter (non-zero B, rsLoRA, a per-module alpha and rank), our export-gguf, and
llama.cpp's logits (llama-cpp-python built from its sdist, float32) against transformers + PEFT's. The bound is 20x
llama.cpp's own float32 floor: the same base without adapter against transformers. The llama.cpp environment is
`bash .ci/servers llama.cpp`'s; without it these tests fail with that recipe (they are marked `serve`).
"""

import json
from pathlib import Path

import pytest
import torch
import transformers
from helpers.adapters import randomize_lora
from helpers.llama_cpp import FACTOR, FAMILIES, PROMPTS, Base, build_bases, hf_logits, worst
from peft import LoraConfig, PeftModel, get_peft_model

from ailora_tools import export_gguf
from ailora_tools.adapters.gguf_export import LAYOUTS, UNVERIFIED
from ailora_tools.errors import UnsupportedError
from ailora_tools.servers import llama_cpp

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def bases(tmp_path_factory, python):
    """Every family's Base, built once per module."""
    return build_bases(tmp_path_factory.mktemp("llama-cpp"), FAMILIES, python)


def trained_like(base: Base, out: Path) -> Path:
    """A PEFT LoRA as after training (random non-zero A and B), rsLoRA, with a per-module alpha and rank."""
    fam = base.family
    model = transformers.AutoModelForCausalLM.from_pretrained(base.model, dtype=torch.float32)
    first, last = fam.targets[0], fam.targets[-1]
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=list(fam.targets),
        alpha_pattern={first: 3.0},
        rank_pattern={last: 2},
        **fam.peft,
    )
    model = get_peft_model(model, config)
    randomize_lora(model, seed=1, scale=0.2).save_pretrained(out)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_serves_the_export_of_every_family(bases, python, family, tmp_path):
    base = bases[family]
    lora = trained_like(base, tmp_path / "lora")
    if family in UNVERIFIED:  # llama.cpp does not serve these as transformers computes them: refused, nothing written
        with pytest.raises(UnsupportedError, match=f"{family!r} is not supported yet"):
            export_gguf(lora, base.model, tmp_path / "lora.gguf")
        assert not (tmp_path / "lora.gguf").exists()
        return
    export_gguf(lora, base.model, tmp_path / "lora.gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(base.model, dtype=torch.float32)
    want = hf_logits(PeftModel.from_pretrained(model, lora).eval())
    effect = worst(want, hf_logits(transformers.AutoModelForCausalLM.from_pretrained(base.model).eval()))
    got = llama_cpp.logits(base.gguf, PROMPTS, lora_gguf=tmp_path / "lora.gguf", python=python)
    diff, bound = worst(got, want), FACTOR * base.floor
    print(f"{family}: adapter {diff:.2e}, floor {base.floor:.2e}, adapter effect {effect:.2e}")
    assert diff <= bound, f"{family}: llama.cpp is {diff:.3g} from transformers, floor {base.floor:.3g}"
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
