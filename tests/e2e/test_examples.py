"""The examples/ folder runs as written: the Trainer script and the end-to-end script on the demo's tiny model, the
GLUE-style comparison on a tiny BERT with a sentence-pair CSV (its settings cut down by extra options)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT
from helpers.encoders import FILLER, sentence

EXAMPLES = ROOT / "examples"
pytestmark = pytest.mark.slow


def run(argv: list[str], cwd: Path) -> str:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # this venv's ailora-tools first
    done = subprocess.run(
        argv,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PATH": path},
    )
    assert done.returncode == 0, f"{argv}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_end_to_end_script_and_trainer_script(tmp_path):
    run(["bash", str(EXAMPLES / "end_to_end.sh")], tmp_path)
    assert json.loads((tmp_path / "e2e" / "merged" / "ailora-merge.json").read_text())["schema"] == 2
    assert (tmp_path / "e2e" / "lora.gguf").stat().st_size > 0
    out = run(
        [
            sys.executable,
            str(EXAMPLES / "trainer_get_ailora_model.py"),
            "e2e/demo/base",
            "trainer-run",
            "e2e/demo/data/train.jsonl",
        ],
        tmp_path,
    )
    assert "LoRA on the original model" in out
    config = json.loads((tmp_path / "trainer-run" / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 16  # rank 2r: [B | -B0]·[A ; A0]


def test_glue_style_comparison_script(encoder, tmp_path):
    rng = random.Random(0)
    for split, n in (("train", 32), ("dev", 16)):
        rows = ["sentence1,sentence2,label"]
        for _ in range(n):
            a = rng.random() < 0.5
            rows.append(f"{sentence(rng, a)},{rng.choice(FILLER)},{'yes' if a else 'no'}")
        (tmp_path / f"{split}.csv").write_text("\n".join(rows) + "\n")
    run(
        [
            "bash",
            str(EXAMPLES / "compare_glue_style.sh"),
            str(encoder("bert-bare")),
            *"train.csv dev.csv cmp --methods lora,ailora --lr 1e-2 --seeds 0,1 --max-steps 2 --rank 4".split(),
            *"--batch-size 8 --quiet".split(),
        ],
        tmp_path,
    )
    verdicts = json.loads((tmp_path / "cmp" / "compare.json").read_text())["verdicts"]
    assert [(v["run"], v["baseline"]) for v in verdicts] == [("lora", "lora"), ("ailora", "lora")]
