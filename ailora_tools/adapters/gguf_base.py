"""The llama.cpp base of `export-base --for llama.cpp`: a full GGUF of the Llama architecture, the NF4 residual's
weights as Q4_0 or Q8_0 (`gguf.quants`), every other matrix as stored, q/k rows permuted, the hyper-parameters and the
tokenizer as llama.cpp's convert_hf_to_gguf.py writes them; each quantised weight's error measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import InputNotFoundError, UnsupportedError
from ..io.checkpoint import Checkpoint
from ..io.output import OutputDir
from ..io.rewrite import Hashes
from ..io.tensorio import read_tensor
from .gguf_export import LAYOUTS, permute_rows
from .nf4_residual import PARTS, packed_shape, quantized_weights, read_dequantized, rel_error


def write_gguf_base(ckpt: Checkpoint, od: OutputDir, fmt: str, hashes: Hashes, progress: bool) -> dict:
    """OUT/base.gguf: a llama.cpp model of the residual, its NF4 weights as Q4_0/Q8_0, streamed tensor by tensor."""
    import gguf

    config = ckpt.config
    layout = LAYOUTS.get(config.get("model_type"))
    if layout is None or layout.arch != "LLAMA" or config.get("num_local_experts"):
        raise UnsupportedError(
            f"--for llama.cpp: a base GGUF of model_type {config.get('model_type')!r} is not "
            "supported (Llama and Mistral are); serve the NF4 residual with vLLM or PEFT"
        )
    qtype = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0}[fmt]
    arch = gguf.MODEL_ARCH.LLAMA
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    packed = quantized_weights(ckpt.tensors)
    plan = _gguf_plan(ckpt, gguf.get_tensor_name_map(arch, n_layers), packed, qtype, fmt)
    writer = gguf.GGUFWriter(str(od.partial("base.gguf")), gguf.MODEL_ARCH_NAMES[arch])
    _add_hparams(writer, config, qtype)
    _add_vocab(writer, ckpt.root, config["vocab_size"])
    for _, out, shape, t, _ in plan:
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, t) if t == qtype else shape
        dt = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(t, np.uint8)
        nbytes = int(np.prod(byte_shape)) * (np.dtype(dt).itemsize if t != gguf.GGMLQuantizationType.BF16 else 2)
        writer.add_tensor_info(
            out, byte_shape, np.dtype(dt) if t != gguf.GGMLQuantizationType.BF16 else np.uint8, nbytes, raw_dtype=t
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    errors = {}
    for name, _out, _shape, t, heads in tqdm(plan, desc=f"gguf {fmt}", unit="tensor", disable=not progress):
        W = read_dequantized(ckpt, name) if name in packed else read_tensor(ckpt.shard(ckpt.tensors[name].file), name)
        if heads is not None:
            W = permute_rows(W, n_head, heads if heads != n_head else None)
        if t == qtype:
            data = gguf.quants.quantize(W.float().numpy(), t)
            back = torch.from_numpy(gguf.quants.dequantize(data, t))
            errors[name.removesuffix(".weight")] = rel_error(back, W)
        elif t == gguf.GGMLQuantizationType.BF16:
            data = W.contiguous().view(torch.uint16).numpy().view(np.uint8)
        else:
            data = W.contiguous().numpy().astype(np.float32 if t == gguf.GGMLQuantizationType.F32 else np.float16)
        writer.write_tensor_data(data)
    writer.close()
    od.publish("base.gguf")
    return {
        "base": str(od.path / "base.gguf"),
        "errors": dict(sorted(errors.items())),
        "tensors": len(plan),
        "config_dir": str(ckpt.root),
    }


def _gguf_plan(ckpt: Checkpoint, names, packed: set[str], qtype, fmt: str) -> list[tuple]:
    """Per tensor of the residual: (hf name, gguf name, shape [out, in] or [n], ggml type, heads to permute by)."""
    import gguf

    config = ckpt.config
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    dropped = {f"{n}.{k}" for n in packed for k in PARTS}
    plan = []  # (hf name, gguf name, shape [out, in] or [n], ggml type, permutation)
    for name, info in ckpt.tensors.items():
        if name in dropped or name.endswith("rotary_emb.inv_freq"):
            continue
        out = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if out is None:
            raise UnsupportedError(
                f"--for llama.cpp: {ckpt.source} has tensor {name}, which llama.cpp's llama "
                "architecture has no place for"
            )
        shape = packed_shape(ckpt, name) if name in packed else tuple(info.shape)
        if name in packed:
            if shape[1] % 32:
                raise UnsupportedError(f"--format {fmt}: rows of 32 values; {name} has {shape[1]}")
            t = qtype
        elif len(shape) == 1 or info.dtype == "F32":
            t = gguf.GGMLQuantizationType.F32
        else:
            t = {"F16": gguf.GGMLQuantizationType.F16, "BF16": gguf.GGMLQuantizationType.BF16}[info.dtype]
        heads = n_head if name.endswith("q_proj.weight") else n_kv if name.endswith("k_proj.weight") else None
        plan.append((name, out, shape, t, heads))
    if config.get("tie_word_embeddings") is False and not any(p[1] == "output.weight" for p in plan):
        raise InputNotFoundError(f"{ckpt.source}: no lm_head.weight, and the config does not tie it to the embedding")
    return plan


def _add_hparams(writer, config: dict, qtype) -> None:
    """Llama hyper-parameters as llama.cpp's convert_hf_to_gguf.py writes them (TextModel + LlamaModel)."""
    import gguf

    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ("default", "linear"):
        raise UnsupportedError(
            f"--for llama.cpp: rope scaling {kind!r} is not supported by export-base (default and linear are)"
        )
    n_head = config["num_attention_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_rope_freq_base(float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(
        {
            gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
            gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
        }[qtype]
    )
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // n_head)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_name(Path(config.get("_name_or_path") or "model").name)


def _add_vocab(writer, root: Path, vocab_size: int) -> None:
    """The tokenizer as convert_hf_to_gguf.py writes it: sentencepiece (`tokenizer.model`, padded with [PADi] to the
    model's vocab size) or a tokenizer.json (`gguf.vocab`), and the special tokens (`gguf.SpecialVocab`)."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab

    vocab, last = None, None
    for cls in (SentencePieceVocab, LlamaHfVocab, BpeVocab):
        try:
            vocab = cls(root)
            break
        except (FileNotFoundError, ValueError, TypeError) as e:
            last = e
    if vocab is None:
        raise InputNotFoundError(
            f"{root}: no tokenizer llama.cpp's converter reads (tokenizer.model, or a "
            f"tokenizer.json of BPE type: {last}); copy the original model's tokenizer "
            "files there"
        )
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [gguf.TokenType.UNUSED] * vocab_size
    for i, (text, score, toktype) in enumerate(vocab.all_tokens()):
        if i >= vocab_size:
            raise UnsupportedError(f"{root}: the tokenizer has more tokens than the model's vocab_size {vocab_size}")
        tokens[i], scores[i], types[i] = text, score, toktype
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(root, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=vocab_size).add_to_gguf(writer)
