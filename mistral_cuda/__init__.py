"""mistral_cuda: inference for the Mistral model family (Mistral-7B, Mixtral) on a C++ core."""

import os as _os

try:
    import mistral_cuda._C  # noqa: F401
except ModuleNotFoundError as _missing:
    if _missing.name != "mistral_cuda._C":
        raise
    _here = _os.path.dirname(_os.path.abspath(__file__))
    raise ImportError(
        f"mistral_cuda was imported from {_here}, which holds no compiled extension "
        "(mistral_cuda._C). This usually means Python found the source tree before the installed "
        "package: running from the repository root (the current directory comes first on "
        "sys.path) after `pip install .` shadows the install. Run from another directory, or "
        "build in place with `pip install -e .` (or build the extension into mistral_cuda/ with "
        "CMake, see the README)."
    ) from None


from mistral_cuda._C import (
    CacheFullError,
    CheckpointError,
    Error,
    InvalidRequestError,
    ModelConfig,
    ModelNotFoundError,
    UnsupportedError,
    cuda_compiled,
    cuda_device_count,
)
from mistral_cuda import sampling
from mistral_cuda.engine import ChatStream, Engine, InsufficientMemoryError, Stream
from mistral_cuda.async_engine import AsyncEngine, QueueFullError, RequestStream
from mistral_cuda.generation import CompletionOutput, RequestOutput
from mistral_cuda.guards import ContentFilteredError, Guard, KeywordGuard, SelfReflectionGuard
from mistral_cuda.llm import LLM
from mistral_cuda.sampling import SamplingParams, TokenLogprob
from mistral_cuda.tokenizer import StreamDecoder, TekkenStreamDecoder, Tokenizer

__version__ = "0.1.0"

__all__ = [
    "AsyncEngine",
    "CacheFullError",
    "ChatStream",
    "CheckpointError",
    "CompletionOutput",
    "ContentFilteredError",
    "Engine",
    "Error",
    "Guard",
    "InsufficientMemoryError",
    "InvalidRequestError",
    "KeywordGuard",
    "LLM",
    "ModelConfig",
    "ModelNotFoundError",
    "QueueFullError",
    "RequestOutput",
    "RequestStream",
    "SamplingParams",
    "SelfReflectionGuard",
    "Stream",
    "StreamDecoder",
    "TekkenStreamDecoder",
    "TokenLogprob",
    "Tokenizer",
    "UnsupportedError",
    "cuda_compiled",
    "cuda_device_count",
    "sampling",
]
