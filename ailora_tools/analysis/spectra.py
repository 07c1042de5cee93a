"""Singular-value spectra of the target matrices, per layer (the AILoRA paper's Fig. 1), streamed like decompose.

Each target W is read alone from its shard (no model in memory). Its singular values come from the
eigenvalues of the float64 Gram matrix of the smaller side (W Wᵀ or Wᵀ W), σ_i = √λ_i: the method decompose
uses for minor components, a few times faster than a float64 SVD here and accurate for σ/σ_max down to about
1e-4 (pretrained attention weights sit near 2e-4). Values below the noise level √(n·eps64)·σ_max are not
resolved; the report counts them. Per module: σ_max, σ_r and σ_{n−r+1} (the edges of the r principal and
the r minor directions), and the fraction of ‖W‖_F² in each. Given a trained adapter, ‖ΔW‖_F per module with
ΔW = s(BA − B0A0) (or s·BA for a standard LoRA). Writes OUT/spectrum.json (last), OUT/spectra.safetensors
(every σ) and PNG plots.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

from tqdm.auto import tqdm

from .. import __version__
from ..adapters.lowrank import delta_factors
from ..devices import resolve_device
from ..errors import NumericsError, UnsupportedError
from ..experts import lift_initial
from ..init.targets import (
    architecture,
    linear_modules,
    matches,
    resolve_targets,
    target_names,
)
from ..io.checkpoint import Checkpoint
from ..io.hashing import file_digest
from ..io.output import OutputDir
from ..io.peft_adapter import read_adapter
from ..io.tensorio import FLOAT_DTYPES, read_tensor
from ..lineage import initial_adapter_of
from ..manifests import (
    SPECTRUM_MANIFEST,
    TRAIN_MANIFEST,
    starts_offset,
)
from .plots import per_layer_figure, spectra_figure

SPECTRA_NAME = "spectra.safetensors"
PLOT_SPECTRA, PLOT_LAYERS, PLOT_DELTA = "spectra.png", "layers.png", "delta.png"
METHOD = "eigvalsh of the float64 Gram matrix of the smaller side"
_LAYER = re.compile(r"\.(\d+)\.")


def spectrum(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    targets: list[str] | tuple[str, ...] = ("q_proj", "v_proj"),
    rank: int = 16,
    adapter: str | os.PathLike | None = None,
    initial: str | os.PathLike | None = None,
    plot_layers: int = 4,
    device: str = "auto",
    revision: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write OUT/spectra.safetensors, PNG plots and, last, OUT/spectrum.json for the target matrices of `model`.

    Args:
        model: local model directory or Hub id (read one target matrix at a time).
        out: output directory; must be empty unless `overwrite`.
        targets: module-name suffixes (architecture aliases resolved, as in decompose).
        rank: r, for the top-r / bottom-r energy and the edge singular values.
        adapter: a trained adapter: adds ‖ΔW‖_F per module. ΔW = s(BA − B0A0) against its initial adapter
            (`initial`, or the one its ailora-train.json names); without either, the adapter is a standard
            LoRA and ΔW = s·BA.
        plot_layers: how many layers (evenly spaced, first and last included) spectra.png shows.
        device: where the eigenvalues are computed: auto, cpu, cuda, cuda:N.
        revision: Hub revision of `model` (as for decompose).
        allow_pickle: accept .bin/.pt weights (loaded with `torch.load(weights_only=True)`).

    Returns:
        Summary: output path, module count, per target the mean top-r / bottom-r energy (and ‖ΔW‖_F), and
        `rows`, one per module: σ_max, energy_top, energy_bottom, delta_fro.

    Raises:
        AiloraError: (a subclass) on bad input (unknown target, rank, non-float weights, an adapter that does
            not fit the model), before anything is written.

    Example:
        >>> spectrum("meta-llama/Llama-3.1-8B", "spec", rank=16)  # doctest: +SKIP
    """
    started = time.perf_counter()
    ckpt = Checkpoint.open(model, revision=revision, allow_pickle=allow_pickle, scratch=Path(out).absolute().parent)
    modules = _modules(ckpt, targets, rank)
    deltas = _adapter_deltas(adapter, initial, ckpt) if adapter is not None else None
    settings = {
        "tool": __version__,
        "source": ckpt.describe(),
        "targets": list(targets),
        "rank": rank,
        "method": METHOD,
        "device": device,
        "adapter": None if deltas is None else {k: v for k, v in deltas.items() if k != "norms"},
    }
    dev = resolve_device(device)
    with OutputDir(out, inputs=[ckpt.root], overwrite=overwrite, settings=settings) as od:
        rows, spectra = _measure(ckpt, modules, rank, dev, progress)
        if deltas is not None:
            _relate_deltas(deltas["norms"], rows, modules)
        rows.sort(key=lambda r: (r["layer"] if r["layer"] is not None else -1, r["target"], r["module"]))
        plots = _write_results(od, ckpt, settings, rows, spectra, deltas, rank, plot_layers)
    summary = {
        "output": str(od.path),
        "modules": len(rows),
        "rank": rank,
        "plots": plots,
        **_means(rows, deltas),
        "rows": _rows(rows, deltas),
    }
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def _relate_deltas(norms: list[dict], rows: list[dict], modules: dict[str, str]) -> None:
    """Each adapter module's row gets its target and ‖ΔW‖_F / ‖W‖_F (in place)."""
    fro = {r["module"]: r["fro_norm"] for r in rows}
    for row in norms:
        row["target"] = modules.get(row["module"], row["module"].rsplit(".", 1)[-1])
        if row["module"] in fro:
            row["delta_rel"] = row["delta_fro"] / fro[row["module"]] if fro[row["module"]] > 0 else None


def _write_results(
    od: OutputDir,
    ckpt: Checkpoint,
    settings: dict,
    rows: list[dict],
    spectra: dict,
    deltas: dict | None,
    rank: int,
    plot_layers: int,
) -> list[str]:
    """OUT/spectra.safetensors, the plots and, last, the manifest; the plots' names."""
    from safetensors.torch import save_file

    save_file(spectra, str(od.partial(SPECTRA_NAME)))
    od.publish(SPECTRA_NAME)
    name = ckpt.repo_id or Path(ckpt.source).name
    plots = _plots(od, rows, spectra, deltas["norms"] if deltas else None, rank, plot_layers, name)
    files = [SPECTRA_NAME, *plots]
    od.write_manifest(
        SPECTRUM_MANIFEST,
        {
            **settings,
            "modules": rows,
            "adapter": None if deltas is None else {**settings["adapter"], "modules": deltas["norms"]},
            "plots": plots,
            "files": {"output": {f: file_digest(od.path / f) for f in files}},
        },
    )
    return plots


def _modules(ckpt: Checkpoint, targets, rank: int) -> dict[str, str]:
    """module -> the target asked for (the stored name when two resolve to one), each checked for dtype and rank."""
    weights = linear_modules(ckpt.tensors)
    resolved = resolve_targets(target_names(targets), list(weights), architecture(ckpt.config), config=ckpt.config)
    modules: dict[str, str] = {}
    for t, name in resolved.items():
        for m in weights:
            if matches(m, name):
                modules[m] = name if m in modules else t
    for m in modules:
        info = weights[m]
        if info.dtype not in FLOAT_DTYPES:
            raise UnsupportedError(
                f"{info.file}: tensor {info.name!r} has dtype {info.dtype}; spectrum supports "
                f"{', '.join(FLOAT_DTYPES)} (dequantize the checkpoint first)"
            )
        if not 1 <= rank < min(info.shape):
            raise NumericsError(
                f"--rank {rank}: {info.name!r} is {info.shape[0]}x{info.shape[1]}, so rank must be "
                f"between 1 and {min(info.shape) - 1}"
            )
    return modules


def _measure(ckpt: Checkpoint, modules: dict[str, str], rank: int, dev, progress: bool):
    """(one row per module, module -> σ on the CPU), reading the targets one at a time in file order on `dev`."""
    import torch

    weights = linear_modules(ckpt.tensors)
    rows, spectra = [], {}
    order = sorted(modules, key=lambda m: (weights[m].file, weights[m].begin))
    for m in tqdm(order, desc="spectrum", unit="matrix", disable=not progress):
        info = weights[m]
        W = read_tensor(ckpt.headers[info.file], info.name).to(dev, torch.float64)
        fro2 = float(W.square().sum())
        if not math.isfinite(fro2):
            raise NumericsError(f"{info.file}: tensor {info.name!r} holds NaN or Inf; fix the checkpoint first")
        spectra[m] = singular_values(W).cpu()
        rows.append(
            {
                "module": m,
                "layer": layer_of(m),
                "target": modules[m],
                "shape": list(info.shape),
                "dtype": info.dtype,
                **spectrum_stats(spectra[m], fro2, rank),
            }
        )
        del W
    return rows, spectra


def _means(rows: list[dict], deltas: dict | None) -> dict:
    """Per target: the mean top-r and bottom-r energy (and ‖ΔW‖_F)."""
    labels = list(dict.fromkeys(r["target"] for r in rows))
    means = {
        **{f"{t}_mean_energy_top": _mean(rows, t, "energy_top") for t in labels},
        **{f"{t}_mean_energy_bottom": _mean(rows, t, "energy_bottom") for t in labels},
    }
    if deltas is not None:
        means.update({f"{t}_mean_delta_fro": _mean(deltas["norms"], t, "delta_fro") for t in labels})
    return means


def _rows(rows: list[dict], deltas: dict | None) -> list[dict]:
    """The summary's rows: σ_max, energy_top, energy_bottom, delta_fro per module."""
    delta_of = {r["module"]: r["delta_fro"] for r in deltas["norms"]} if deltas is not None else {}
    return [
        {
            "module": r["module"],
            "sigma_max": r["sigma_max"],
            "energy_top": r["energy_top"],
            "energy_bottom": r["energy_bottom"],
            "delta_fro": delta_of.get(r["module"]),
        }
        for r in rows
    ]


def singular_values(W):
    """σ, descending, of a float64 matrix: the square roots of its smaller Gram matrix's eigenvalues."""
    import torch

    return torch.linalg.eigvalsh(W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W).clamp(min=0).sqrt().flip(0)


def spectrum_stats(s, fro2: float, rank: int) -> dict:
    """The per-module numbers of the report, from σ (descending) and ‖W‖_F²."""
    n = s.numel()
    sq = s.square()
    floor = float(s[0]) * math.sqrt(n * 2.220446049250313e-16)
    return {
        "sigma_max": float(s[0]),
        "sigma_min": float(s[-1]),
        "sigma_top_edge": float(s[rank - 1]),  # σ_r: the smallest of the r principal directions
        "sigma_bottom_edge": float(s[n - rank]),  # σ_{n−r+1}: the largest of the r minor directions
        "energy_top": float(sq[:rank].sum()) / fro2 if fro2 > 0 else 0.0,
        "energy_bottom": float(sq[n - rank :].sum()) / fro2 if fro2 > 0 else 0.0,
        "fro_norm": math.sqrt(fro2),
        "stable_rank": fro2 / float(sq[0]) if float(sq[0]) > 0 else 0.0,
        "noise_floor": floor,
        "unresolved": int((s <= floor).sum()),
    }


def layer_of(module: str) -> int | None:
    """The layer index in a module name (the first dotted integer), or None (e.g. lm_head)."""
    found = _LAYER.search(f"{module}.")
    return int(found.group(1)) if found else None


def _adapter_deltas(adapter, initial, ckpt) -> dict:
    """{"trained", "initial", "norms": [{"module", "layer", "delta_fro"}]}, with ‖ΔW‖_F from small QR factors."""
    import torch

    trained = read_adapter(adapter)
    trained.check_fits(ckpt.tensors, adapter=adapter, base=ckpt.source, config=ckpt.config)
    if initial is None and (Path(adapter) / TRAIN_MANIFEST).is_file():
        initial = initial_adapter_of(Path(adapter))
    if initial is not None:
        lifted = lift_initial(read_adapter(initial), trained)  # experts trained fused: the initial in that form
        pairs, scale, _ = delta_factors(lifted, trained, offset=starts_offset(initial))
    else:
        pairs = {m: (B.double() * trained.scale(m), A.double()) for m, (A, B) in trained.factors.items()}
        scale = 1.0
    norms = []
    for m, (B, A) in sorted(pairs.items()):
        core = torch.linalg.qr(B).R @ torch.linalg.qr(A.T).R.T  # ‖B·A‖_F = ‖R_B R_Aᵀ‖_F, no out×in product
        norms.append({"module": m, "layer": layer_of(m), "delta_fro": scale * float(torch.linalg.matrix_norm(core))})
    return {
        "trained": str(Path(adapter).absolute()),
        "initial": None if initial is None else str(Path(initial).absolute()),
        "norms": norms,
    }


def _mean(rows: list[dict], target: str, key: str) -> float | None:
    values = [r[key] for r in rows if r.get("target") == target and r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _plots(od: OutputDir, rows, spectra, norms, rank: int, plot_layers: int, source: str) -> list[str]:
    written = []
    layers, targets, at = _grid(rows)
    if layers:
        k = max(1, min(plot_layers, len(layers)))
        shown = sorted({layers[round(i * (len(layers) - 1) / max(k - 1, 1))] for i in range(k)})
        panels = [
            (f"layer {x}", {t: spectra[at[(x, t)]["module"]].tolist() for t in targets if (x, t) in at}) for x in shown
        ]
        with od.open_atomic(PLOT_SPECTRA) as f:
            spectra_figure(f, panels, rank, f"Singular values of {', '.join(targets)} ({source})")
        bottom = f"share of ‖W‖²_F in the bottom {rank} directions"
        series = {
            "σ_max": _series(at, layers, targets, "sigma_max"),
            f"share of ‖W‖²_F in the top {rank} directions": _series(at, layers, targets, "energy_top"),
            bottom: _series(at, layers, targets, "energy_bottom"),
        }
        with od.open_atomic(PLOT_LAYERS) as f:
            per_layer_figure(f, layers, series, f"Per-layer spectra, r = {rank} ({source})", log=(bottom,))
        written += [PLOT_SPECTRA, PLOT_LAYERS]
    layers, targets, at = _grid(norms or [])
    if layers:
        series = {"‖ΔW‖_F": _series(at, layers, targets, "delta_fro")}
        if any("delta_rel" in r for r in norms):
            series["‖ΔW‖_F / ‖W‖_F"] = _series(at, layers, targets, "delta_rel")
        with od.open_atomic(PLOT_DELTA) as f:
            per_layer_figure(f, layers, series, "Trained update per layer")
        written.append(PLOT_DELTA)
    return written


def _grid(rows: list[dict]) -> tuple[list[int], list[str], dict]:
    """Layers, line labels and (layer, label) -> row. A label is the target, or the module's name inside its
    layer where one target matches several modules of a layer (GPT-2's attn.c_proj and mlp.c_proj)."""
    count: dict[tuple, int] = {}
    for r in rows:
        count[(r["layer"], r["target"])] = count.get((r["layer"], r["target"]), 0) + 1
    at = {}
    for r in rows:
        if r["layer"] is None:
            continue
        label = r["target"] if count[(r["layer"], r["target"])] == 1 else r["module"].split(f".{r['layer']}.", 1)[1]
        at[(r["layer"], label)] = r
    return sorted({x for x, _ in at}), list(dict.fromkeys(t for _, t in at)), at


def _series(at: dict, layers: list[int], targets: list[str], key: str) -> dict[str, list]:
    return {t: [at[(x, t)].get(key) if (x, t) in at else None for x in layers] for t in targets}
