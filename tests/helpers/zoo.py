"""Tiny random models of the architectures people fine-tune (transformers 5.25), each as small as its class allows,
saved in several shards with a character-level tokenizer; the support matrix (test_architectures.py) and the fused
projection tests build them from here."""

import json
import string
from pathlib import Path

import torch
import transformers as tf

import helpers

VOCAB = 112  # the tokenizer's 104 tokens fit; a few ids spare
#: the tokenizer's <s>, </s> and <pad>
IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)
#: the tests' tiny decoder (`helpers.DECODER`) with this vocabulary, a narrower MLP and the tokenizer's ids
SMALL = dict(helpers.DECODER, vocab_size=VOCAB, intermediate_size=64, **IDS)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
MOE = dict(num_experts_per_tok=2)
ATTN = "q_proj,v_proj"
#: the tests' tiny encoder (`helpers.ENCODER`) with this vocabulary
ENCODER = dict(helpers.ENCODER, vocab_size=VOCAB, max_position_embeddings=66, pad_token_id=3)
#: model_type -> (model class, config class, config kwargs, targets the matrix adapts)
ZOO = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(SMALL, rope_parameters=LLAMA3_ROPE), ATTN),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", SMALL, ATTN),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(SMALL, head_dim=16), ATTN),
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        dict(SMALL, head_dim=16, num_experts=4, moe_intermediate_size=32, **MOE),
        ATTN,
    ),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(SMALL, head_dim=16), ATTN),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(SMALL, head_dim=16, num_local_experts=4, **MOE), ATTN),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(SMALL, head_dim=16, sliding_window=8), ATTN),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(SMALL, head_dim=16, sliding_window=8), ATTN),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(SMALL, original_max_position_embeddings=64), "qkv_proj"),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(SMALL, rotary_pct=0.5), "query_key_value"),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", SMALL, ATTN),
    "gpt_oss": (
        "GptOssForCausalLM",
        "GptOssConfig",
        dict(SMALL, head_dim=16, num_local_experts=4, sliding_window=8, experts_per_token=2, **MOE),
        ATTN,
    ),
    "smollm3": ("SmolLM3ForCausalLM", "SmolLM3Config", SMALL, ATTN),
    "gpt2": (
        "GPT2LMHeadModel",
        "GPT2Config",
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, **IDS),
        "c_attn",
    ),
    "bert": ("BertForMaskedLM", "BertConfig", ENCODER, ATTN),
    "roberta": ("RobertaForMaskedLM", "RobertaConfig", dict(ENCODER, type_vocab_size=1), ATTN),
    "modernbert": (
        "ModernBertForMaskedLM",
        "ModernBertConfig",
        dict(
            ENCODER,
            num_hidden_layers=3,
            global_attn_every_n_layers=2,
            local_attention=8,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
            mask_token_id=4,
        ),
        "Wqkv",
    ),
    "t5": (
        "T5ForConditionalGeneration",
        "T5Config",
        dict(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            pad_token_id=3,
            eos_token_id=2,
            decoder_start_token_id=3,
        ),
        ATTN,
    ),
}
SEQ2SEQ = {"t5"}
MASKED = {"bert", "roberta", "modernbert"}


def tokenizer():
    """A character-level tokenizer (104 tokens) with the specials every task needs."""
    from tokenizers import Tokenizer, decoders, models

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<mask>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable[:-1]))}
    chars = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    chars.decoder = decoders.Fuse()
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=chars,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        mask_token="<mask>",
    )


def build(kind: str, path: Path, *, seed: int = 0) -> Path:
    """Save a tiny random `kind` (a ZOO key) at `path` in several shards, with non-zero biases and the tokenizer."""
    model_cls, config_cls, kwargs, _ = ZOO[kind]
    torch.manual_seed(seed)
    model = getattr(tf, model_cls)(getattr(tf, config_cls)(**kwargs)).float()
    with torch.no_grad():  # biases and norm weights away from their init, so that they matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.dim() == 1:
                p.normal_(0.5 if p.dim() == 1 and not name.endswith("bias") else 0, 0.1)
    model.save_pretrained(path, max_shard_size="100KB")
    tokenizer().save_pretrained(path)
    return Path(path)


def auto_class(kind: str):
    return (
        tf.AutoModelForSeq2SeqLM
        if kind in SEQ2SEQ
        else tf.AutoModelForMaskedLM
        if kind in MASKED
        else tf.AutoModelForCausalLM
    )


def logits(kind: str, model_dir, adapter=None) -> torch.Tensor:
    """Logits of a saved model (float32), with a PEFT adapter on it when given, on fixed random ids."""
    model = auto_class(kind).from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    ids = torch.randint(5, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    extra = {"decoder_input_ids": ids[:, :6]} if kind in SEQ2SEQ else {}
    with torch.no_grad():
        return model(input_ids=ids, **extra).logits


def data(path: Path, n: int = 8) -> Path:
    """JSONL text rows (causal and masked LM read {"text": ...})."""
    rows = [
        {"text": f"The {w} sat on {i} mats near {w[::-1]}."}
        for i, w in enumerate(["cat", "dog", "owl", "emu", "yak", "ant", "bee", "eel"][:n])
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
