"""Publish a directory to the Hugging Face Hub with a model card; the token is never printed or logged."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from huggingface_hub import HfApi

from ..errors import HubError, InputNotFoundError
from ..init import METHODS
from ..io.peft_adapter import CONFIG_NAME
from ..manifests import (
    ADAPTER_DIR,
    CONVERT_MANIFEST,
    DECOMPOSE_MANIFEST,
    TRAIN_MANIFEST,
    read_manifest,
)
from .rules import vllm_max_lora_rank

CARD_NAME = "README.md"
#: never uploaded: hidden files (locks, partial files) and training checkpoints
IGNORED = [".*", "**/.*", "checkpoints/**"]
MANIFESTS = {"decompose": DECOMPOSE_MANIFEST, "train": TRAIN_MANIFEST, "convert": CONVERT_MANIFEST}


def model_card(directory: Path, repo_id: str = "REPO_ID") -> str:
    """A README.md with YAML front matter (base_model, library_name: peft, tags, license) and usage."""
    d = Path(directory)
    adapter = d / ADAPTER_DIR if (d / ADAPTER_DIR / CONFIG_NAME).is_file() else d  # a decompose output, or an adapter
    cfg = json.loads((adapter / CONFIG_NAME).read_text()) if (adapter / CONFIG_NAME).is_file() else {}
    trained, converted = _manifest(d, "train"), _manifest(d, "convert")
    initial = (trained or {}).get("initial_adapter") or (converted or {}).get("initial")
    decomposed = (
        _manifest(d, "decompose")
        or _manifest(d.parent, "decompose")
        or (_manifest(Path(initial).parent, "decompose") if initial else None)
        or {}
    )
    source = (decomposed.get("source") or {}).get("model")
    base = (cfg.get("base_model_name_or_path") if converted else source) or source or cfg.get("base_model_name_or_path")
    base = base or "unknown"
    method = decomposed.get("method", "lora")
    task = (trained or converted or {}).get("task") or {}  # the class the adapter's module names are for
    body = [
        *_card_summary(repo_id, base, method, cfg),
        *_card_history(trained, converted, decomposed),
        *_card_roles(decomposed.get("roles", {})),
        *_card_usage(base, repo_id, cfg, task),
    ]
    return "\n".join(_card_front_matter(base, method)) + "\n\n" + "\n".join(body)


def _card_front_matter(base: str, method: str) -> list[str]:
    tags = list(dict.fromkeys(["ailora-tools", "lora", method]))
    front = ["---", f"base_model: {base}", "library_name: peft", "tags:", *[f"- {t}" for t in tags]]
    if license_ := _license(base):
        front.append(f"license: {license_}")
    return [*front, "---"]


def _card_summary(repo_id: str, base: str, method: str, cfg: dict) -> list[str]:
    link = f"[{base}](https://huggingface.co/{base})" if _is_hub_id(base) else f"`{base}`"
    what = f"**{method}** ({METHODS[method].summary})" if method in METHODS else f"**{method}**"
    return [
        f"# {repo_id.rsplit('/', 1)[-1]}",
        "",
        f"A LoRA adapter for {link} made with ailora-tools.",
        "",
        f"- initialisation: {what}",
        f"- rank: {cfg.get('r')}, lora_alpha: {cfg.get('lora_alpha')}, rsLoRA: {bool(cfg.get('use_rslora'))}",
        f"- target modules: {', '.join(cfg.get('target_modules') or [])}",
    ]


def _card_history(trained: dict | None, converted: dict | None, decomposed: dict) -> list[str]:
    """What the adapter applies to, and its training."""
    lines = []
    if converted:
        lines.append("- converted to a standard LoRA on the original base: apply it to the untouched base model")
    elif decomposed.get("adapter_base") == "residual":
        lines.append(
            "- applies to the residual base that decompose wrote, not to the original model; run "
            "`ailora-tools convert` for a LoRA on the original"
        )
    if trained:
        s = trained.get("summary", {})
        lines.append(
            f"- training: {s.get('steps')} steps, loss {s.get('first_loss')} → {s.get('last_loss')}, "
            f"eval loss {s.get('eval_loss')}"
        )
    return lines


def _card_roles(roles: dict) -> list[str]:
    """A table of the modules' roles (the first 12)."""
    if not roles:
        return []
    role_lines = "".join(f"| `{m}` | {r} |\n" for m, r in sorted(roles.items())[:12])
    more = f"| … | {len(roles) - 12} more |\n" if len(roles) > 12 else ""
    return ["", "| module | role |", "| --- | --- |", role_lines + more]


def _card_usage(base: str, repo_id: str, cfg: dict, task: dict) -> list[str]:
    """How to load the adapter with PEFT, vLLM and llama.cpp."""
    r = cfg.get("r") or 16
    auto, head = task.get("auto_class", "AutoModelForCausalLM"), task.get("config") or {}
    load = "".join(
        f", {k}={v}"
        for k, v in (("num_labels", len(head.get("id2label", {})) or None), ("pad_token_id", head.get("pad_token_id")))
        if v is not None
    )
    return [
        "",
        "## Use",
        "",
        "PEFT:",
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {auto}",
        f'model = PeftModel.from_pretrained({auto}.from_pretrained("{base}"{load}), "{repo_id}")',
        "```",
        "",
        "vLLM:",
        "",
        "```bash",
        f"vllm serve {base} --enable-lora --max-lora-rank {vllm_max_lora_rank(r)} --lora-modules adapter={repo_id}",
        "```",
        "",
        "llama.cpp:",
        "",
        "```bash",
        "ailora-tools export-gguf ADAPTER_DIR --base BASE_DIR -o adapter.gguf",
        "llama-cli -m base.gguf --lora adapter.gguf",
        "```",
        "",
    ]


def _is_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name).expanduser().exists()


def _uploaded(rel: Path) -> bool:
    return not any(part.startswith(".") for part in rel.parts) and rel.parts[0] != "checkpoints"


def _manifest(d: Path, kind: str) -> dict | None:
    return read_manifest(Path(d) / MANIFESTS[kind]) or None


def _license(base: str) -> str | None:
    card = Path(base) / CARD_NAME
    if card.is_file():
        m = re.search(r"^---\s*\n(.*?)\n---", card.read_text(), re.S)
        if m and (lic := re.search(r"^license:\s*(\S+)", m.group(1), re.M)):
            return lic.group(1)
    return None


def push(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
) -> dict:
    """create_repo + upload_folder; writes README.md (model card) into `directory` when it has none.

    The token comes from `token`, HF_TOKEN or the HF cache (huggingface_hub's rules) and is never
    printed. `dry_run` uploads nothing and writes nothing: it returns the files, sizes and the card.

    Example:
        >>> push("lora", "me/llama31-ailora", private=True)  # doctest: +SKIP
    """
    d = Path(directory)
    if not d.is_dir() or not any(d.iterdir()):
        raise InputNotFoundError(f"{d}: no such directory, or it is empty")
    card = (d / CARD_NAME).read_text() if (d / CARD_NAME).is_file() else model_card(d, repo_id)
    files = [
        (str(p.relative_to(d)), p.stat().st_size)
        for p in sorted(d.rglob("*"))
        if p.is_file() and _uploaded(p.relative_to(d)) and p.name != CARD_NAME
    ]
    files.append((CARD_NAME, len(card.encode())))
    summary = {
        "repo_id": repo_id,
        "private": private,
        "revision": revision,
        "dry_run": dry_run,
        "files": [{"path": p, "bytes": n} for p, n in sorted(files)],
        "card": card,
    }
    if dry_run:
        return summary
    if not (d / CARD_NAME).is_file():
        tmp = d / f".{CARD_NAME}.partial"
        tmp.write_text(card)
        os.replace(tmp, d / CARD_NAME)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=str(d),
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {d.name} with ailora-tools",
            ignore_patterns=IGNORED,
        )
    except Exception as e:  # httpx/requests connection errors, HfHubHTTPError (401, 403, 404...)
        raise HubError(
            f"push {repo_id}: the Hub refused or could not be reached ({e.__class__.__name__}: "
            f"{' '.join(str(e).split())[:200]}); check your network, HF_ENDPOINT and token "
            "(`huggingface-cli login`)"
        ) from e
    summary["url"] = str(getattr(commit, "commit_url", None) or url)
    return summary
