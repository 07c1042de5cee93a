"""The comparison tests' shared data: an MRPC-shaped sentence-pair corpus."""

import random

import pytest
from helpers.encoders import FILLER, sentence


def pairs_csv(path, n: int, seed: int):
    """MRPC-shaped CSV: sentence1, sentence2, label ("yes" when sentence1 is positive)."""
    rng = random.Random(seed)
    lines = ["sentence1,sentence2,label"]
    for _ in range(n):
        a = rng.random() < 0.5
        lines.append(f"{sentence(rng, a)},{rng.choice(FILLER)},{'yes' if a else 'no'}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    return pairs_csv(root / "train.csv", 32, 1), pairs_csv(root / "dev.csv", 16, 2)
