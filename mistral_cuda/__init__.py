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
from mistral_cuda.engine import ChatStream, Engine, Stream
from mistral_cuda.generation import CompletionOutput, RequestOutput
from mistral_cuda.guards import ContentFilteredError, Guard, KeywordGuard, SelfReflectionGuard
from mistral_cuda.llm import LLM
from mistral_cuda.sampling import SamplingParams, TokenLogprob
from mistral_cuda.tokenizer import StreamDecoder, TekkenStreamDecoder, Tokenizer

__version__ = "0.1.0"

__all__ = [
    "CacheFullError",
    "ChatStream",
    "CheckpointError",
    "CompletionOutput",
    "ContentFilteredError",
    "Engine",
    "Error",
    "Guard",
    "InvalidRequestError",
    "KeywordGuard",
    "LLM",
    "ModelConfig",
    "ModelNotFoundError",
    "RequestOutput",
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
