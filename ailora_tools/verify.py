"""Check an output directory: complete, every file as its manifest recorded it (train's checkpoints too), and for
decompose outputs that residual + adapter still reconstruct the source weights with the recorded error."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import InputNotFoundError
from .io.hashing import file_digest
from .io.output import JOURNAL_NAME
from .io.peft_adapter import read_adapter
from .io.tensorio import read_header, read_tensor
from .manifests import (
    ADAPTER_DIR,
    CKPT_DIR,
    DECOMPOSE_MANIFEST,
    MANIFESTS,
    RESIDUAL_DIR,
)


def verify(path: str | os.PathLike, *, reconstruction: bool = True) -> dict:
    """Return {"manifest", "files_checked", "modules_checked", "checkpoints_checked", "problems", "notes"}.

    Every output below `path` is checked too (a compare's runs, a folder of outputs such as the demo's), each
    problem prefixed with its directory, and so is every checkpoint of a `train` output (`checkpoints/step-N/`, as
    its manifest records them; `checkpoints_checked` lists them, a note says which were removed). An empty
    `problems` list means everything there is complete and intact.

    Raises:
        InputNotFoundError: `path` is not a directory.

    Example:
        >>> verify("out")["problems"]  # doctest: +SKIP
        []
    """
    root = Path(path)
    if not root.is_dir():
        raise InputNotFoundError(f"{root}: no such output directory")
    report = _verify_one(root, reconstruction, top=True)
    subs = sorted({p.parent for m in MANIFESTS for p in root.rglob(m)} - {root})
    subs = [d for d in subs if not any(part.startswith(".") for part in d.relative_to(root).parts)]
    if report["manifest"] is None and subs:  # a folder of outputs, e.g. the demo's
        report["problems"] = [p for p in report["problems"] if not p.startswith("no manifest")]
    for sub in subs:
        part = _verify_one(sub, reconstruction)
        for key in ("files_checked", "modules_checked"):
            report[key] += part[key]
        report["checkpoints_checked"] += [f"{sub.relative_to(root)}/{c}" for c in part["checkpoints_checked"]]
        for key in ("problems", "notes"):
            report[key] += [f"{sub.relative_to(root)}: {line}" for line in part[key]]
    if subs:
        inner = f"{len(subs)} outputs below ({', '.join(str(d.relative_to(root)) for d in subs)})"
        report["manifest"] = f"{report['manifest']} and {inner}" if report["manifest"] else inner
    if report["checkpoints_checked"]:
        report["manifest"] += f", {len(report['checkpoints_checked'])} train checkpoints"
    return report


def _verify_one(root: Path, reconstruction: bool, top: bool = False) -> dict:
    """One output directory: its own manifest and the files it records (and, `top`, unfinished files below it)."""
    report = {
        "path": str(root),
        "manifest": None,
        "files_checked": 0,
        "modules_checked": 0,
        "checkpoints_checked": [],
        "problems": [],
        "notes": [],
    }
    problems = report["problems"]
    leftovers = sorted(str(p.relative_to(root)) for p in root.rglob(".*.partial")) if top else []
    if leftovers:
        problems.append(f"unfinished files from an interrupted run: {', '.join(leftovers[:5])}")
    if (root / JOURNAL_NAME).is_file():
        problems.append("an interrupted run's journal is present: rerun the same command with --resume")
    found = [m for m in MANIFESTS if (root / m).is_file()]
    if not found:
        problems.append(
            f"no manifest ({' / '.join(MANIFESTS)}): not an ailora-tools output directory, or its run has not finished"
        )
        return report
    report["manifest"] = found[0]
    manifest = json.loads((root / found[0]).read_text())
    _check_files(root, manifest.get("files", {}).get("output", {}), report)
    _check_checkpoints(root, manifest, report)
    if reconstruction and found[0] == DECOMPOSE_MANIFEST and (root / RESIDUAL_DIR).is_dir():
        _check_reconstruction(root, manifest, report)
    return report


def _check_files(root: Path, files: dict[str, str], report: dict) -> None:
    for rel, digest in sorted(files.items()):
        f = root / rel
        if not f.is_file():
            report["problems"].append(f"{rel}: missing")
        elif file_digest(f) != digest:
            report["problems"].append(f"{rel}: content differs from the manifest (the file changed or is corrupt)")
        report["files_checked"] += 1


def _check_checkpoints(root: Path, manifest: dict, report: dict) -> None:
    """train's checkpoints, each as the manifest recorded it; one removed whole is a note, not a problem."""
    recorded = manifest.get("files", {}).get(CKPT_DIR)
    if recorded is None:
        if (root / CKPT_DIR).is_dir():
            report["notes"].append(
                f"{CKPT_DIR}/ not checked: the manifest records no digests for it (written by an older ailora-tools)"
            )
        return
    steps: dict[str, dict[str, str]] = {}
    for rel, digest in recorded.items():
        steps.setdefault(str(Path(rel).parent), {})[rel] = digest
    for step, files in sorted(steps.items()):
        if not (root / step).is_dir():
            report["notes"].append(f"{step}: removed, not checked")
            continue
        _check_files(root, files, report)
        report["checkpoints_checked"].append(step)


def _check_reconstruction(root: Path, manifest: dict, report: dict) -> None:
    src_root = Path(manifest["source"]["path"])
    if not src_root.is_dir():
        report["notes"].append(f"source {src_root} is not here: reconstruction not checked")
        return
    adapter = read_adapter(root / ADAPTER_DIR, dora=True)
    recorded = manifest["files"]["source"]
    for module, stats in sorted(manifest["modules"].items()):
        if "shard" not in stats:
            continue
        src = src_root / stats["shard"]
        if not src.is_file() or file_digest(src) != recorded.get(stats["shard"]):
            report["notes"].append(f"source shard {stats['shard']} changed or is gone: reconstruction not checked")
            return
        W = read_tensor(read_header(src), stats["tensor"]).double()
        R = read_tensor(read_header(root / RESIDUAL_DIR / stats["shard"]), stats["tensor"]).double()
        A, B = adapter.factors[module]
        delta = adapter.scale(module) * (B.double() @ A.double())  # as decompose computed it
        err = float((R + (delta.T if adapter.config.get("fan_in_fan_out") else delta) - W).abs().max())
        if not err <= stats["recon_max_abs"] * 1.01 + 1e-9 * float(W.abs().max()):
            report["problems"].append(
                f"{module}: residual + adapter differs from the source by {err:.3g} "
                f"(recorded {stats['recon_max_abs']:.3g})"
            )
        report["modules_checked"] += 1
