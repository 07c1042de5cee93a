"""Statistics of each target module, summed by hooks on the modules while its layer runs: LoRA-DA's (`StatisticsHooks`,
backward), the loss gradient alone (`GradientHooks`, backward: LoRA-GA), the input covariance (`CovarianceHooks`,
forward only: CorDA) and the inputs' centred scatter (`CenteredHooks`, forward only: EVA). A hooks class's `BACKWARD`
says whether the runner takes the loss and goes back down."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from .batches import Batch


@dataclass
class ModuleStatistics:
    """Statistics of one target linear module W [out, in]; tensors float32 on the CPU, None where the hooks that
    summed them do not take them."""

    name: str
    #: modules with the same key read the same input and share `input_factor` (the same tensor object)
    input_key: str
    input_factor: torch.Tensor | None  # Z = E[x xᵀ] (CorDA: PEFT's covariance; EVA: float64 scatter), [in, in]
    output_factor: torch.Tensor | None  # E[g²], [out]
    gradient: torch.Tensor | None  # G = ∂L/∂W averaged over samples, [out, in]
    tokens: int  # tokens Z and the output factor average over
    samples: int  # samples G averages over
    skipped: int  # samples left out for having no loss token
    loss: float  # mean calibration loss over the samples


class StatisticsHooks:
    """Hooks on one layer's target modules; sums in float32 on the device: Σxxᵀ per distinct input, Σg², Σgᵀx."""

    BACKWARD = True

    def __init__(self, layer: torch.nn.Module, targets: dict[str, str], dev: torch.device):
        self.handles, self.key, self.z, self.y, self.g = [], {}, {}, {}, {}
        self.tokens = 0
        for local, name in targets.items():
            m = layer.get_submodule(local)
            self.y[name] = torch.zeros(m.out_features, dtype=torch.float32, device=dev)
            self.g[name] = torch.zeros(m.out_features, m.in_features, dtype=torch.float32, device=dev)
            self.handles += [
                m.register_forward_pre_hook(partial(self._input, name)),
                m.register_forward_hook(partial(self._output, name)),
            ]

    def start(self, batch: Batch) -> None:
        self.batch, self.x, self.seen, self.real_x = batch, {}, [], {}
        self.tokens += int(batch.factor.sum())

    def _input(self, name: str, _module, args) -> None:
        key = next((k for seen, k in self.seen if seen is args[0]), None)
        if key is None:  # the first module to read this tensor names it and sums its Z
            key = name
            self.seen.append((args[0], key))
            x = args[0].detach()[self.batch.factor].float()
            if key not in self.z:
                self.z[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self.z[key].addmm_(x.T, x)
        self.key[name], self.x[name] = key, args[0].detach()

    def _output(self, name: str, _module, _args, out: torch.Tensor) -> None:
        out.register_hook(partial(self._gradient, name))

    def _gradient(self, name: str, g: torch.Tensor) -> None:
        key = self.key[name]
        if key not in self.real_x:
            self.real_x[key] = self.x[name][self.batch.real].float()
        self.g[name].addmm_(g[self.batch.real].float().T, self.real_x[key])
        self.y[name].add_(g[self.batch.factor].float().square().sum(0))

    def results(self, samples: int, skipped: int, loss: float) -> list[ModuleStatistics]:
        for h in self.handles:
            h.remove()
        z = {k: (v / self.tokens).cpu() for k, v in self.z.items()}
        return [
            ModuleStatistics(
                name,
                self.key[name],
                z[self.key[name]],
                (self.y[name] / self.tokens).cpu(),
                (self.g[name] / samples).cpu(),
                self.tokens,
                samples,
                skipped,
                loss,
            )
            for name in self.y
        ]


class GradientHooks:
    """Hooks that sum only Σgᵀx per module (G, the loss gradient of W): PEFT's `preprocess_loraga` statistics."""

    BACKWARD = True

    def __init__(self, layer: torch.nn.Module, targets: dict[str, str], dev: torch.device):
        self.handles, self.g, self.tokens = [], {}, 0
        for local, name in targets.items():
            m = layer.get_submodule(local)
            self.g[name] = torch.zeros(m.out_features, m.in_features, dtype=torch.float32, device=dev)
            self.handles += [
                m.register_forward_pre_hook(partial(self._input, name)),
                m.register_forward_hook(partial(self._output, name)),
            ]

    def start(self, batch: Batch) -> None:
        self.batch, self.x = batch, {}
        self.tokens += int(batch.real.sum())

    def _input(self, name: str, _module, args) -> None:
        self.x[name] = args[0].detach()

    def _output(self, name: str, _module, _args, out: torch.Tensor) -> None:
        out.register_hook(partial(self._gradient, name))

    def _gradient(self, name: str, g: torch.Tensor) -> None:
        real = self.batch.real
        self.g[name].addmm_(g[real].float().T, self.x.pop(name)[real].float())

    def results(self, samples: int, skipped: int, loss: float) -> list[ModuleStatistics]:
        for h in self.handles:
            h.remove()
        return [
            ModuleStatistics(name, name, None, None, (g / samples).cpu(), self.tokens, samples, skipped, loss)
            for name, g in self.g.items()
        ]


class _InputHooks:
    """Forward pre-hooks on the targets that see each distinct input once a batch: targets reading the same tensor
    (q/k/v) share the first one's key (`first`)."""

    BACKWARD = False

    def __init__(self, layer: torch.nn.Module, targets: dict[str, str], dev: torch.device):
        self.handles, self.key, self.z, self.tokens = [], {}, {}, 0
        for local, name in targets.items():
            self.handles.append(layer.get_submodule(local).register_forward_pre_hook(partial(self._input, name)))

    def start(self, batch: Batch) -> None:
        self.batch, self.seen = batch, []
        self.tokens += int(batch.real.sum())

    def first(self, name: str, x: torch.Tensor) -> bool:
        """Record `name`'s input key; True when `x` is new this batch (then its key is `name`)."""
        key = next((k for seen, k in self.seen if seen is x), None)
        if key is None:
            self.seen.append((x, name))
        self.key[name] = key or name
        return key is None

    def _close(self) -> None:
        for h in self.handles:
            h.remove()


class CovarianceHooks(_InputHooks):
    """Forward hooks that sum CorDA's input covariance as PEFT's `preprocess_corda` does with one sample per forward
    call: C = mean over samples of X̂ᵀX̂, X̂ a sample's inputs (its real tokens) divided by |max(X)|; once per
    distinct input (q/k/v share theirs)."""

    def __init__(self, layer: torch.nn.Module, targets: dict[str, str], dev: torch.device):
        super().__init__(layer, targets, dev)
        self.samples = 0

    def start(self, batch: Batch) -> None:
        super().start(batch)
        self.samples += len(batch.ids)

    @torch.no_grad()
    def _input(self, name: str, _module, args) -> None:
        if self.first(name, args[0]):
            for row, real in zip(args[0], self.batch.real):
                x = row[real].float()
                x = x / x.max().abs()
                if name not in self.z:
                    self.z[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
                self.z[name].addmm_(x.T, x)

    def results(self, samples: int, skipped: int, loss: float) -> list[ModuleStatistics]:
        self._close()
        z = {k: (v / self.samples).cpu() for k, v in self.z.items()}
        return [
            ModuleStatistics(name, key, z[key], None, None, self.tokens, samples, skipped, loss)
            for name, key in self.key.items()
        ]


class CenteredHooks(_InputHooks):
    """Forward hooks that sum, once per distinct input, Σx and Σxxᵀ over its real tokens in float64 and hand over the
    centred scatter Σ(x − μ)(x − μ)ᵀ: what PEFT's EVA takes the incremental PCA of (its inputs, mean removed)."""

    def __init__(self, layer: torch.nn.Module, targets: dict[str, str], dev: torch.device):
        super().__init__(layer, targets, dev)
        self.sum = {}

    @torch.no_grad()
    def _input(self, name: str, _module, args) -> None:
        if self.first(name, args[0]):
            x = args[0].detach()[self.batch.real].double()
            if name not in self.z:
                self.z[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                self.sum[name] = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.z[name].addmm_(x.T, x)
            self.sum[name].add_(x.sum(0))

    def results(self, samples: int, skipped: int, loss: float) -> list[ModuleStatistics]:
        self._close()
        z = {k: (v - torch.outer(self.sum[k], self.sum[k]) / self.tokens).cpu() for k, v in self.z.items()}
        return [
            ModuleStatistics(name, key, z[key], None, None, self.tokens, samples, skipped, loss)
            for name, key in self.key.items()
        ]
