"""mistral_cuda: inference for the Mistral model family (Mistral-7B, Mixtral) on a C++ core."""

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
from mistral_cuda.engine import Engine, Stream
from mistral_cuda.generation import CompletionOutput, RequestOutput
from mistral_cuda.llm import LLM
from mistral_cuda.sampling import SamplingParams, TokenLogprob
from mistral_cuda.tokenizer import StreamDecoder, Tokenizer

__version__ = "0.1.0"

__all__ = [
    "CacheFullError",
    "CheckpointError",
    "CompletionOutput",
    "Engine",
    "Error",
    "InvalidRequestError",
    "LLM",
    "ModelConfig",
    "ModelNotFoundError",
    "RequestOutput",
    "SamplingParams",
    "Stream",
    "StreamDecoder",
    "TokenLogprob",
    "Tokenizer",
    "UnsupportedError",
    "cuda_compiled",
    "cuda_device_count",
    "sampling",
]
