"""PEFT's own data-aware inits, as the tests compare with them and the benchmark times them: `peft_init` runs
`preprocess_corda` or `preprocess_loraga` over calibration samples one at a time (each its own forward call, or its
own backward: PEFT's working form, which ours reproduces), then `get_peft_model`; for EVA, `get_peft_model` and then
`initialize_lora_eva_weights` on one padded batch of every sample; `calibration_rows` gives the samples decompose
reads."""

from __future__ import annotations

import torch


def calibration_rows(src, data, task: str, count: int, max_length: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `count` samples of `data` as decompose reads them for `task` (the same function), those with a loss
    token, as (input ids, labels) tensors of one row each."""
    from ailora_tools.init.lora_da.method import calibration_samples
    from ailora_tools.io.checkpoint import Checkpoint
    from ailora_tools.io.examples import IGNORE
    from ailora_tools.options import DecomposeOptions

    ckpt = Checkpoint.open(src)
    _, examples, _ = calibration_samples(ckpt, data, task, DecomposeOptions(task=task), count, max_length, seed=0)
    keep = [e for e in examples if any(label != IGNORE for label in e.labels[task == "causal-lm" :])]
    return [(torch.tensor([e.input_ids]), torch.tensor([e.labels])) for e in keep]


def padded(rows) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` (input ids of one row each) as one right-padded batch: (input ids, attention mask)."""
    width = max(ids.shape[1] for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (row, _) in enumerate(rows):
        ids[i, : row.shape[1]], mask[i, : row.shape[1]] = row[0], 1
    return ids, mask


def peft_eva(model, rows, lora):
    """PEFT's EVA: the PEFT model of `lora` (`init_lora_weights="eva"`), initialised on one batch of all `rows`."""
    from peft import get_peft_model
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    ids, mask = padded(rows)
    peft = get_peft_model(model.eval(), lora, low_cpu_mem_usage=True)
    initialize_lora_eva_weights(peft, [{"input_ids": ids, "attention_mask": mask}], show_progress_bar=False)
    return peft


def peft_init(model, method: str, rows, *, rank: int, alpha: float, targets, **config):
    """`model` (loaded) with PEFT's init `method` ("corda", "eva", else LoRA-GA) over `rows`: the PEFT model
    (residual + adapter) and its `LoraConfig`. `config`: `corda_mode` ("ipm" or "kpm"), `rho` for EVA (every real
    token: `use_label_mask=False`, as ours takes them), or `LoraGAConfig`'s fields."""
    from peft import EvaConfig, LoraConfig, LoraGAConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    from peft.tuners.lora.loraga import preprocess_loraga

    common = dict(r=rank, lora_alpha=alpha, target_modules=list(targets))
    if method == "corda":
        mode = config.get("corda_mode", "ipm")
        lora = LoraConfig(**common, init_lora_weights="corda", corda_config=CordaConfig(corda_method=mode))
        model.eval()
        preprocess_corda(model, lora, run_model=lambda: [model(input_ids=ids) for ids, _ in rows])
    elif method == "eva":
        eva = EvaConfig(rho=config.get("rho", 2.0), use_label_mask=False)
        lora = LoraConfig(**common, init_lora_weights="eva", eva_config=eva)
        return peft_eva(model, rows, lora), lora
    else:
        lora = LoraConfig(**common, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(**config))

        def train_step():
            for ids, labels in rows:
                model(input_ids=ids, labels=labels).loss.backward()

        preprocess_loraga(model, lora, train_step)
    return get_peft_model(model, lora), lora
