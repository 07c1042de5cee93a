"""Manifest schema: every manifest records its `schema`; `manifests.upgrade` reads an older one in today's shape."""

import json

from ailora_tools import decompose
from ailora_tools.io.checkpoint import Checkpoint
from ailora_tools.io.output import MANIFEST_SCHEMA
from ailora_tools.manifests import base_of, check_base, read_manifest, upgrade


def test_a_schema_1_decompose_manifest_reads_as_todays(tiny, tmp_path):
    out = tmp_path / "dec"
    decompose(tiny("llama"), out, rank=4, progress=False)
    written = json.loads((out / "ailora.json").read_text())
    assert written["schema"] == MANIFEST_SCHEMA
    today = base_of(out / "adapter")
    old = {k: v for k, v in written.items() if k not in ("schema", "applies_to")}  # as 0.1 wrote it
    (out / "ailora.json").write_text(json.dumps(old))
    assert read_manifest(out / "ailora.json")["schema"] == MANIFEST_SCHEMA
    was = base_of(out / "adapter")
    assert (was.kind, was.original, was.residual, was.method) == (
        today.kind,
        today.original,
        today.residual,
        today.method,
    )
    assert was.samples["residual"] and was.samples["residual"].items() <= today.samples["residual"].items()
    assert check_base(out / "adapter", Checkpoint.open(out / "residual")) is None


def test_a_schema_1_convert_manifest_applies_to_the_original():
    assert upgrade({"rank": 8}, "ailora-convert.json")["applies_to"]["kind"] == "original"
    current = {"schema": MANIFEST_SCHEMA, "applies_to": {"kind": "residual"}}
    assert upgrade(current, "ailora-convert.json") is current
