"""The project's exceptions: one base class, each also a builtin so callers can catch either."""


class AiloraError(Exception):
    """Base of every error this toolkit raises on bad input; the CLI prints it as one line."""


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
    """An option value out of range (a rank of 0, a negative alpha, a batch size of 0...)."""


class HubError(AiloraError, ConnectionError):
    """The Hugging Face Hub could not be reached, or refused a request."""


class RankError(AiloraError):
    """Another rank of a torchrun launch failed while computing its share."""


class AiloraWarning(Warning):
    """Something the user should know about a result that is still written (the CLI prints it as one line);
    not a UserWarning, so that --quiet, which silences the libraries' warnings, keeps it."""
