"""Reading and writing checkpoints without loading them: safetensors by byte range (`tensorio`), a local or Hub
checkpoint resolved once (`checkpoint`), outputs that never look complete before they are (`output`), BLAKE3
digests (`hashing`), the shard-by-shard rewrite engine (`rewrite`) and its I/O threads (`background`)."""

from .checkpoint import Checkpoint
from .hashing import file_digest
from .output import OutputDir
from .rewrite import Hashes, Replaced, pending, rewrite_checkpoint
from .tensorio import read_header, read_tensor

__all__ = [
    "Checkpoint",
    "OutputDir",
    "Hashes",
    "Replaced",
    "file_digest",
    "pending",
    "read_header",
    "read_tensor",
    "rewrite_checkpoint",
]
