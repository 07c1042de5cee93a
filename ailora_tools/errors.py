"""The project's exceptions: one base class, each also a builtin so callers can catch either."""

from __future__ import annotations

import re

#: an option named in an error message: its field name in braces, `{max_rank}`
_NAMED = re.compile(r"\{([a-z][a-z0-9_]*)\}")


class AiloraError(Exception):
    """Base of every error this toolkit raises on bad input; the CLI prints it as one line.

    A message names each option by its field name in braces (`"{rank} 0: must be at least 1"`): `str()` writes the
    library's keyword (`rank 0: ...`), `spelled(flag)` the caller's spelling (the CLI: `--rank 0: ...`). `field` is
    the first option named (None when the message names none).
    """

    def __str__(self) -> str:
        return self.spelled(lambda name: name)

    def spelled(self, spell) -> str:
        """The message with each named option written as `spell(field_name)`."""
        return _NAMED.sub(lambda m: spell(m[1]), super().__str__())

    @property
    def field(self) -> str | None:
        """The first option the message names."""
        return next(iter(_NAMED.findall(super().__str__())), None)


class InputNotFoundError(AiloraError, FileNotFoundError):
    """A model, shard, adapter or data file that does not exist."""


class FormatError(AiloraError, ValueError):
    """A file that exists but is not what it claims to be (safetensors header, index, adapter config)."""


class UnsupportedError(AiloraError, ValueError):
    """Valid input this toolkit cannot handle (dtype, architecture, fused projection, pickle)."""


class TargetError(AiloraError, ValueError):
    """Target modules or roles that do not fit the model."""


class NumericsError(AiloraError, ValueError):
    """NaN/Inf in a weight, or a rank the matrix cannot give."""


class OutputError(AiloraError, FileExistsError):
    """An output directory that is not empty, lies inside the input, or is locked by another run."""


class OptionError(AiloraError, ValueError):
    """An option value out of range (a rank of 0, a negative alpha, a batch size of 0...), or options that clash."""


class HubError(AiloraError, ConnectionError):
    """The Hugging Face Hub could not be reached, or refused a request."""


class RankError(AiloraError):
    """Another rank of a torchrun launch failed while computing its share."""


class AiloraWarning(Warning):
    """Something the user should know about a result that is still written (the CLI prints it as one line);
    not a UserWarning, so that --quiet, which silences the libraries' warnings, keeps it."""
