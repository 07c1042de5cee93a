"""PNG figures for `spectrum` and `compare` (matplotlib's object API with the Agg canvas: no pyplot, no display).

Each function draws one figure from plain data and writes it to an open binary file, so callers publish it
through `OutputDir.open_atomic`.
"""

from __future__ import annotations

from typing import BinaryIO

#: colours for targets / runs, in order (matplotlib's tab10)
COLOURS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
)
DPI = 110


def _figure(ncols: int, *, width: float = 4.2, height: float = 3.4):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=DPI, layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _save(fig, f: BinaryIO) -> None:
    fig.savefig(f, format="png")


def spectra_figure(f: BinaryIO, panels: list[tuple[str, dict[str, list[float]]]], rank: int, title: str) -> None:
    """One panel per layer: σ_i / σ_max (log scale) against i / n for each target, the kept edges marked.

    Args:
        panels: (panel title, {target: singular values, descending}) per layer.
        rank: r; dotted lines mark the r-th largest and r-th smallest direction of the first target.
    """
    fig, axes = _figure(len(panels), width=3.6)
    for ax, (name, spectra) in zip(axes, panels):
        for colour, (target, s) in zip(COLOURS, spectra.items()):
            n = len(s)
            top = s[0] if s[0] > 0 else 1.0
            ax.semilogy([(i + 0.5) / n for i in range(n)], [max(v / top, 1e-12) for v in s], color=colour, label=target)
        n = len(next(iter(spectra.values())))
        for edge in (rank / n, 1 - rank / n):
            ax.axvline(edge, color="black", linestyle=":", linewidth=0.8)
        ax.set_title(name)
        ax.set_xlabel("i / n (descending σ)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("σ_i / σ_max")
    axes[0].legend()
    fig.suptitle(title)
    _save(fig, f)


def per_layer_figure(
    f: BinaryIO,
    layers: list[int],
    series: dict[str, dict[str, list[float | None]]],
    title: str,
    *,
    log: tuple[str, ...] = (),
) -> None:
    """One panel per quantity, one line per target, plotted against the layer index.

    Args:
        series: panel title -> {target: one value per entry of `layers` (None where absent)}.
        log: panel titles drawn on a log y axis.
    """
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(len(series))
    for ax, (panel, lines) in zip(axes, series.items()):
        for colour, (target, values) in zip(COLOURS, lines.items()):
            pts = [(x, v) for x, v in zip(layers, values) if v is not None]
            ax.plot([x for x, _ in pts], [v for _, v in pts], marker="o", markersize=3, color=colour, label=target)
        if panel in log:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(panel)
        ax.set_xlabel("layer")
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    _save(fig, f)


def band_figure(
    f: BinaryIO,
    series: dict[str, list[list[tuple[int, float]]]],
    *,
    title: str,
    ylabel: str,
    target: float | None = None,
) -> None:
    """A value against step, one line per run group: the mean over its curves (seeds), with a band of ± one
    standard deviation where there are several.

    Args:
        series: group name -> [curve, ...], each curve [(step, value), ...].
        target: a horizontal dashed line at this value (the "steps to reach" threshold).
    """
    import statistics

    fig, (ax,) = _figure(1, width=6.4, height=4.2)
    for colour, (name, curves) in zip(COLOURS * 10, series.items()):
        at: dict[int, list[float]] = {}
        for curve in curves:
            for step, v in curve:
                at.setdefault(step, []).append(v)
        steps = sorted(at)
        mean = [statistics.fmean(at[s]) for s in steps]
        ax.plot(
            steps,
            mean,
            color=colour,
            label=name + (f" ({len(curves)} seeds)" if len(curves) > 1 else ""),
            marker="o" if len(steps) <= 30 else None,
            markersize=3,
        )
        if len(curves) > 1:
            std = [statistics.stdev(at[s]) if len(at[s]) > 1 else 0.0 for s in steps]
            ax.fill_between(
                steps,
                [m - d for m, d in zip(mean, std)],
                [m + d for m, d in zip(mean, std)],
                color=colour,
                alpha=0.2,
                linewidth=0,
            )
    _against_step(fig, ax, f, title=title, ylabel=ylabel, target=target)


def _against_step(fig, ax, f: BinaryIO, *, title: str, ylabel: str, target: float | None) -> None:
    """Finish a value-against-step figure (the target as a dashed line, labels, grid, legend) and write it."""
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", linewidth=0.8, label=f"target {target:.3g}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    _save(fig, f)
