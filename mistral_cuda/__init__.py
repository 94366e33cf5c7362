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
from mistral_cuda.engine import Engine

__version__ = "0.1.0"

__all__ = [
    "CacheFullError",
    "CheckpointError",
    "Engine",
    "Error",
    "InvalidRequestError",
    "ModelConfig",
    "ModelNotFoundError",
    "UnsupportedError",
    "cuda_compiled",
    "cuda_device_count",
]
