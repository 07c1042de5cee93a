"""Every setting of every command, declared once as a typed dataclass field.

A field carries its default, its help text and its range; from these come the library's keyword arguments
(`decompose(model, out, rank=32)`), the command-line options (`cli.flags` generates them), the recipe tables
(`config.py`) and the manifests (`asdict`). A new option is one field here. Values are checked when the object is
built, so `decompose(alpha=0)` and `ailora-tools decompose --alpha 0` fail the same way: one line naming the option
(`alpha` in the library, `--alpha` on the command line), nothing read or written.
"""
from .commands import (
    CHECK_TARGETS,
    CLASSIFICATION,
    DORA_MODES,
    DTYPES,
    METRICS,
    OUTTYPES,
    REGRESSION,
    SERVER_FORMATS,
    SERVERS,
    VLLM_MAX_LORA_RANKS,
    CheckOptions,
    CompareOptions,
    ConvertOptions,
    DemoOptions,
    ExportBaseOptions,
    ExportGgufOptions,
    MergeOptions,
    OnBase,
    PushOptions,
    Report,
    ServeCheckOptions,
    SpectrumOptions,
    Streams,
    VerifyOptions,
    Writes,
)
from .fields import Options, at_least, check, choice, flag, option
from .pipeline import (
    ADAPTER_BASES,
    COMPUTE_DTYPES,
    QUANTIZE,
    SCHEDULERS,
    SVD_MODES,
    TASKS,
    DecomposeOptions,
    InitOptions,
    TaskOptions,
    TrainOptions,
)

__all__ = [
    "Options", "option", "flag", "check", "at_least", "choice",
    "TaskOptions", "InitOptions", "DecomposeOptions", "TrainOptions",
    "CompareOptions", "ConvertOptions", "MergeOptions", "ExportGgufOptions", "ExportBaseOptions", "CheckOptions",
    "PushOptions",    "SpectrumOptions", "VerifyOptions", "DemoOptions", "Report", "Writes", "Streams", "OnBase",
    "ServeCheckOptions",
    "DTYPES", "SERVERS", "CHECK_TARGETS", "VLLM_MAX_LORA_RANKS", "OUTTYPES", "SERVER_FORMATS", "DORA_MODES",
    "CLASSIFICATION", "REGRESSION", "METRICS", "SVD_MODES", "SCHEDULERS", "COMPUTE_DTYPES", "ADAPTER_BASES",
    "QUANTIZE", "TASKS",
]
