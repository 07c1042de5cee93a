"""Adapter factors that stay frozen in training: MiCA's B (`init.mica`), as decompose's manifest records them
(`manifests.frozen_factors`). The factor's `requires_grad` is cleared and, where PEFT has it (0.19+), the factor is
registered as PEFT's MiCA variant registers it (`frozen_peft_weight_names`), so PEFT's own adapter switching keeps
it frozen too."""

from __future__ import annotations


def freeze_factors(model, which: tuple[str, ...], adapter_name: str = "default") -> int:
    """Freeze the factors `which` ("lora_A", "lora_B") of every LoRA layer of a PEFT model; return how many.

    Example:
        >>> freeze_factors(peft_model, ("lora_B",))  # doctest: +SKIP
    """
    from peft.tuners.lora import LoraLayer

    count = 0
    for layer in model.modules():
        if not which or not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
            continue
        for name in which:
            getattr(layer, name)[adapter_name].weight.requires_grad_(False)
            count += 1
        if hasattr(layer, "frozen_peft_weight_names"):
            names = dict(layer.frozen_peft_weight_names)
            names[adapter_name] = tuple(dict.fromkeys((*names.get(adapter_name, ()), *which)))
            layer.frozen_peft_weight_names = names
    return count
