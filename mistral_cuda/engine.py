"""The Python entry point: load a model directory and run it through the C++ runner."""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from mistral_cuda import _C

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _dtype_name(dtype: Union[None, str, torch.dtype]) -> str:
    if dtype is None:
        return "float32"  # the CPU backend computes in float32 whatever the checkpoint holds
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {dtype}; expected float32, bfloat16 or float16")
        return _DTYPE_NAMES[dtype]
    if isinstance(dtype, str):
        return dtype.removeprefix("torch.")
    raise TypeError(f"dtype must be None, a str or a torch.dtype, got {type(dtype).__name__}")


class Engine:
    """A loaded model: `config`, the C++ runner `model`, and whole-sequence helpers."""

    def __init__(self, model: _C.Model):
        self._model = model

    @classmethod
    def from_pretrained(
        cls,
        model_dir: Union[str, os.PathLike],
        device: str = "cpu",
        dtype: Union[None, str, torch.dtype] = None,
        block_size: int = 16,
        num_blocks: Optional[int] = None,
        progress: bool = True,
    ) -> "Engine":
        """Loads a Hugging Face (config.json) or Mistral consolidated (params.json) directory.

        block_size: tokens per KV-cache block. num_blocks: blocks in the KV pool (default: room
        for four full-length sequences, capped near 8 GiB). progress: show a progress bar.
        """
        bar = tqdm(total=0, unit="B", unit_scale=True, desc="Loading weights", disable=not progress)

        def report(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            model = _C.Model.load(
                os.fspath(model_dir),
                device=device,
                dtype=_dtype_name(dtype),
                block_size=block_size,
                num_blocks=0 if num_blocks is None else num_blocks,
                progress=report,
            )
        finally:
            bar.close()
        return cls(model)

    @property
    def config(self) -> _C.ModelConfig:
        return self._model.config

    @property
    def model(self) -> _C.Model:
        return self._model

    @property
    def device(self) -> str:
        return self._model.device

    def logits(self, token_ids: Sequence[int], chunk_size: Optional[int] = None) -> torch.Tensor:
        """float32 logits [len(token_ids), vocab_size] of every position, computed through the
        KV cache on a fresh sequence, feeding the prompt `chunk_size` tokens per step."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise _C.InvalidRequestError("token_ids is empty")
        if chunk_size is None:
            chunk_size = len(ids)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        seq = self._model.add_sequence()
        try:
            rows = [
                self._model.step([(seq, ids[i : i + chunk_size])], all_logits=True)[0]
                for i in range(0, len(ids), chunk_size)
            ]
        finally:
            self._model.free_sequence(seq)
        return torch.cat(rows)
