"""llama.cpp test families and helpers: tiny models of every family its converter handles, their base GGUFs
written by llama.cpp's own converter, and logits to compare (shared by tests/servers/)."""

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
import transformers

from ailora_tools.servers import llama_cpp
from helpers import DECODER, spm_tokenizer
from helpers.adapters import randomize_lora

PROMPTS = [torch.randint(3, 100, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (12, 7)]
#: llama.cpp against transformers, with an adapter: within this many times the same base's floor without one
FACTOR = 20


@dataclass(frozen=True)
class Family:
    """A tiny model of one architecture: its config class and arguments, LoRA targets, tokenizer kind."""

    config: str
    kwargs: dict
    targets: tuple[str, ...]
    bpe: bool = False  # the converter reads only a byte-level BPE tokenizer.json for it (else sentencepiece)
    peft: dict = field(default_factory=dict)
    legacy: dict = field(
        default_factory=dict
    )  # config.json keys the converter reads and transformers 5 no longer writes


SMALL = dict(DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
#: GPT-OSS's rope (transformers' GptOssConfig default, as its checkpoints), which says truncate: false
GPT_OSS_YARN = {
    "rope_type": "yarn",
    "rope_theta": 150000.0,
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "original_max_position_embeddings": 4096,
    "truncate": False,
}
BPE_VOCAB = 50257  # GPT-2's (llama.cpp's converter recognises a BPE tokenizer by its output: a real one)
FAMILIES = {
    "llama": Family(
        "LlamaConfig",
        {
            **SMALL,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
        ATTN + MLP,
    ),
    "mistral": Family("MistralConfig", {**SMALL, "sliding_window": None}, ATTN + MLP),
    "mixtral": Family("MixtralConfig", {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2}, ATTN),
    "smollm3": Family("SmolLM3Config", {**SMALL}, ATTN + MLP),
    "qwen2": Family("Qwen2Config", SMALL, ATTN + MLP),
    "qwen3": Family("Qwen3Config", {**SMALL, "head_dim": 16}, ATTN + MLP),
    "qwen3_moe": Family(
        "Qwen3MoeConfig",
        {
            **SMALL,
            "vocab_size": BPE_VOCAB,
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,  # as Qwen3-MoE checkpoints (llama.cpp's qwen3moe normalises the top-k weights)
        },
        ATTN,
        bpe=True,
    ),
    "gemma2": Family(  # tied, as every Gemma 2: llama.cpp's gemma2 reads no output matrix (its converter drops lm_head)
        "Gemma2Config",
        {**SMALL, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8, "tie_word_embeddings": True},
        ATTN + MLP,
    ),
    "gemma3_text": Family(
        "Gemma3TextConfig", {**SMALL, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8}, ATTN + MLP
    ),
    "phi3": Family(
        "Phi3Config",
        {**SMALL, "original_max_position_embeddings": 64},
        ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    ),
    "gpt_neox": Family(
        "GPTNeoXConfig",
        {**SMALL, "vocab_size": BPE_VOCAB, "num_key_value_heads": None},
        ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
        bpe=True,
        legacy={"rotary_pct": 0.25},  # transformers 5: rope_parameters' partial_rotary_factor
    ),
    "olmo2": Family("Olmo2Config", {**SMALL, "vocab_size": BPE_VOCAB}, ATTN + MLP, bpe=True),
    "gpt_oss": Family(
        "GptOssConfig",
        {
            **SMALL,
            "vocab_size": BPE_VOCAB,
            "head_dim": 16,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 8,
            "rope_parameters": {**GPT_OSS_YARN, "truncate": True},  # llama.cpp's YaRN always truncates (see docs)
        },
        ATTN,
        bpe=True,
    ),
    "gpt2": Family(
        "GPT2Config",
        dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=BPE_VOCAB),
        ("c_attn", "c_proj", "c_fc"),
        bpe=True,
        peft={"fan_in_fan_out": True},
        legacy={"n_ctx": 64},  # transformers 5: n_positions only
    ),
}


def llama_spm_tokenizer(root: Path) -> Path:
    """A 100-piece sentencepiece model trained on the demo corpus (llama.cpp's converters read tokenizer.model)."""
    # llama.cpp's vocab loader looks "<|endoftext|>" up in a model named phi3
    return spm_tokenizer(root, user_defined_symbols=["<|endoftext|>"])


def gpt2_tokenizer(root: Path, python: str) -> Path:
    """GPT-2's byte-level BPE as a tokenizer.json, from the vocabulary llama.cpp ships (models/ggml-vocab-gpt-2.gguf):
    the converter identifies a BPE pre-tokenizer by hashing its output, so only a real one passes."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    reader = gguf.GGUFReader(llama_cpp.source_dir(python) / "models" / "ggml-vocab-gpt-2.gguf")
    fields = {k: v.contents() for k, v in reader.fields.items() if k.startswith("tokenizer.ggml.")}
    vocab = {t: i for i, t in enumerate(fields["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"})
    )
    return root / "tokenizer.json"


def hf_logits(model) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([p])).logits[0].float() for p in PROMPTS]


def worst(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@dataclass
class Base:
    """A tiny model and llama.cpp's GGUF of it; with `trained`, a trained-like LoRA on it (`lora`), the model it trains
    (the LoRA merged) and llama.cpp's GGUF of that."""

    family: Family
    model: Path
    gguf: Path
    lora: Path | None = None
    trained: Path | None = None
    trained_gguf: Path | None = None

    @cached_property
    def floor(self) -> float:
        """llama.cpp's float32 floor on this base: max |logit difference| against transformers, without adapter."""
        model = transformers.AutoModelForCausalLM.from_pretrained(self.model, dtype=torch.float32).eval()
        return worst(llama_cpp.logits(self.gguf, PROMPTS), hf_logits(model))

    @cached_property
    def trained_logits(self) -> list[torch.Tensor]:
        """llama.cpp's logits for the trained model as its own converter writes it (the LoRA merged)."""
        return llama_cpp.logits(self.trained_gguf, PROMPTS)

    @cached_property
    def trained_floor(self) -> float:
        """llama.cpp's float32 floor on the trained model: its own converter on the LoRA merged, against transformers
        on it (what llama.cpp gives that model without any export of ours)."""
        model = transformers.AutoModelForCausalLM.from_pretrained(self.trained, dtype=torch.float32).eval()
        return worst(self.trained_logits, hf_logits(model))


def trained_like(model_dir: Path, fam: Family, out: Path) -> Path:
    """A PEFT LoRA as after training (random non-zero A and B), rsLoRA, with a per-module alpha and rank."""
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
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
    randomize_lora(get_peft_model(model, config), seed=1, scale=0.2).save_pretrained(out)
    return out


def _finish(root: Path, model_dir: Path, fam: Family, python: str) -> Path:
    """Add to a saved model the config keys llama.cpp's converter reads and a tokenizer it reads."""
    saved = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**saved, **fam.legacy}, indent=2))
    if fam.bpe:
        if not (root / "bpe" / "tokenizer.json").is_file():
            gpt2_tokenizer(root / "bpe", python)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (model_dir / f).write_bytes((root / "bpe" / f).read_bytes())
    else:
        spm = root / "tokenizer.model" if (root / "tokenizer.model").is_file() else llama_spm_tokenizer(root)
        (model_dir / "tokenizer.model").write_bytes(spm.read_bytes())
    return model_dir


def save_model(root: Path, name: str, fam: Family, python: str) -> Path:
    """A tiny random model of `fam` at root/name (norms and biases moved off their init, so a misplaced one shows),
    with its tokenizer and the config keys llama.cpp's converter reads."""
    torch.manual_seed(0)
    config = getattr(transformers, fam.config)(**{"tie_word_embeddings": False, **fam.kwargs})
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(root / name, max_shard_size="500KB")
    return _finish(root, root / name, fam, python)


def save_trained(root: Path, name: str, model_dir: Path, fam: Family, python: str) -> tuple[Path, Path]:
    """`trained_like`'s LoRA on model_dir at root/name-lora, and the model it trains (merged) at root/name-trained."""
    from peft import PeftModel

    lora = trained_like(model_dir, fam, root / f"{name}-lora")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    PeftModel.from_pretrained(model, lora).merge_and_unload().save_pretrained(root / f"{name}-trained")
    return lora, _finish(root, root / f"{name}-trained", fam, python)


def build_bases(root: Path, families: dict[str, Family], python: str, trained: bool = False) -> dict[str, Base]:
    """Each family's Base (with `trained`, its trained-like LoRA and merged model too): the models, and llama.cpp's
    converter on all of them (one process)."""
    models = {name: save_model(root, name, fam, python) for name, fam in families.items()}
    bases = {name: Base(fam, models[name], root / f"{name}.gguf") for name, fam in families.items()}
    jobs = [(b.model, b.gguf) for b in bases.values()]
    for name, b in bases.items() if trained else ():
        b.lora, b.trained = save_trained(root, name, b.model, b.family, python)
        b.trained_gguf = root / f"{name}-trained.gguf"
        jobs.append((b.trained, b.trained_gguf))
    llama_cpp.convert_bases(jobs, python=python)
    return bases
