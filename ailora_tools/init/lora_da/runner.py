"""The streamed model runner: embeddings, then each layer over all samples without autograd, the head's loss and
its gradient, then each layer again from the top with autograd while hooks take the statistics; for forward-only
statistics (CorDA's) the hooks take them in the first pass, which stops at the last target layer
(docs/lora-da-calibration.md)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm import tqdm

from .batches import Batch
from .parts import ModelParts
from .spill import SpillStore
from .statistics import ModuleStatistics, StatisticsHooks

HEAD_CHUNK_BYTES = 32 << 20  # float32 logits per lm_head chunk


def run_layers(
    net: ModelParts,
    targets: dict[int, dict[str, str]],
    batches: list[Batch],
    skipped: int,
    budget: int,
    scratch,
    progress: bool,
    hooks=StatisticsHooks,
) -> Iterator[ModuleStatistics]:
    """Each target's statistics as `hooks` (a class of `statistics`) sum them, layer by layer from the top, or from
    the bottom for forward-only hooks (`targets`: layer index -> {local name: full name}); layer inputs and gradients
    spill beyond `budget` bytes into files under `scratch`; closes `net` at the end."""
    layers, first = len(net.layers), min(targets)
    samples = sum(len(b.ids) for b in batches)
    store = SpillStore(budget, scratch)
    steps = 2 * layers - first + 2 if hooks.BACKWARD else max(targets) + 2
    bar = tqdm(total=steps, desc="calibration", unit="step", disable=not progress)
    try:
        if not hooks.BACKWARD:
            yield from _forward_statistics(net, store, batches, targets, hooks, (samples, skipped), bar)
            return
        _forward(net, store, batches, first, bar)
        loss = _head(net, store, batches, layers) / samples
        bar.update()
        for i in range(layers - 1, first - 1, -1):  # backward, recomputing each layer from its input
            layer = net.load(net.layers[i])
            collector = hooks(layer, targets[i], net.device) if i in targets else None
            for b, batch in enumerate(batches):
                h = store.get(("h", i, b), remove=True).to(net.device).requires_grad_(True)
                grad = store.get(("g", i + 1, b), remove=True).to(net.device)
                if collector is not None:
                    collector.start(batch)
                with torch.enable_grad():
                    out = _output(layer(h, **net.layer_kwargs(i, h, batch)))
                    out.backward(grad)
                if i > first:
                    store.put(("g", i, b), h.grad)
                del h, grad, out
            net.unload(layer)
            bar.update()
            if collector is not None:
                yield from collector.results(samples, skipped, loss)
    finally:
        bar.close()
        store.close()
        net.close()


@torch.no_grad()
def _forward(net: ModelParts, store: SpillStore, batches: list[Batch], first: int, bar) -> None:
    """Embeddings, then every layer, keeping the inputs of the layers the backward pass recomputes (from `first`)."""
    for b, h in enumerate(net.embed(batches)):
        store.put(("h", 0, b), h)
    bar.update()
    for i in range(len(net.layers)):
        layer = net.load(net.layers[i])
        for b, batch in enumerate(batches):
            h = store.get(("h", i, b), remove=i < first).to(net.device)
            store.put(("h", i + 1, b), _output(layer(h, **net.layer_kwargs(i, h, batch))))
        net.unload(layer)
        bar.update()


@torch.no_grad()
def _forward_statistics(
    net: ModelParts, store: SpillStore, batches: list[Batch], targets: dict, hooks, counts: tuple, bar
) -> Iterator[ModuleStatistics]:
    """Embeddings, then each layer up to the last target one with `hooks` on its targets, keeping only the next
    layer's inputs; each target layer's statistics as soon as it is done (`counts`: samples, skipped)."""
    for b, h in enumerate(net.embed(batches)):
        store.put(("h", 0, b), h)
    bar.update()
    for i in range(max(targets) + 1):
        layer = net.load(net.layers[i])
        collector = hooks(layer, targets[i], net.device) if i in targets else None
        for b, batch in enumerate(batches):
            h = store.get(("h", i, b), remove=True).to(net.device)
            if collector is not None:
                collector.start(batch)
            store.put(("h", i + 1, b), _output(layer(h, **net.layer_kwargs(i, h, batch))))
        net.unload(layer)
        bar.update()
        if collector is not None:
            yield from collector.results(*counts, float("nan"))


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _head(net: ModelParts, store: SpillStore, batches: list[Batch], layers: int) -> float:
    """Σ over samples of their mean loss; puts ∂(Σ L_n)/∂h of the last hidden states in the store."""
    parts = net.head_parts()
    rows = max(1, HEAD_CHUNK_BYTES // (4 * net.config.vocab_size))
    total = 0.0
    for b, batch in enumerate(batches):
        h = store.get(("h", layers, b), remove=True).to(net.device).requires_grad_(True)
        for s in range(0, len(batch.rows), rows):
            part = slice(s, s + rows)
            with torch.enable_grad():
                logits = net.head(parts, h[batch.rows[part], batch.cols[part]]).float()
                loss = (net.loss(logits, batch.labels[part]) * batch.weights[part]).sum()
                loss.backward()
            total += float(loss.detach())
        store.put(("g", layers, b), h.grad)
        del h
    for part in parts:
        net.unload(part)
    return total
