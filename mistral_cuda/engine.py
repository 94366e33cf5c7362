"""The Python entry point: load a model directory and run it through the C++ runner."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from mistral_cuda import _C, generation
from mistral_cuda.cuda_libs import preload_cublas
from mistral_cuda.generation import CompletionOutput, Request
from mistral_cuda.sampling import SamplingParams
from mistral_cuda.tokenizer import Tokenizer, find_tokenizer_file

Prompt = Union[str, Sequence[int]]

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _dtype_name(dtype: Union[None, str, torch.dtype]) -> Optional[str]:
    """None (the backend's default: float32 on the CPU, bfloat16 on CUDA), or a dtype name."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {dtype}; expected float32, bfloat16 or float16")
        return _DTYPE_NAMES[dtype]
    if isinstance(dtype, str):
        return dtype.removeprefix("torch.")
    raise TypeError(f"dtype must be None, a str or a torch.dtype, got {type(dtype).__name__}")


def _model_options(device: str, dtype, block_size: int, num_blocks: Optional[int], mmap: bool) -> _C.ModelOptions:
    options = _C.ModelOptions()
    options.device = device
    options.dtype = _dtype_name(dtype)
    options.block_size = block_size
    options.num_blocks = 0 if num_blocks is None else num_blocks
    options.mmap = bool(mmap)
    return options


def _prepare_device(device: str) -> None:
    if device in ("cuda", "auto") and _C.cuda_compiled() and _C.cuda_device_count() > 0:
        preload_cublas()


class Engine:
    """A loaded model: `config`, the C++ runner `model`, its `tokenizer`, and generation."""

    def __init__(
        self,
        model: _C.Model,
        tokenizer: Optional[Tokenizer] = None,
        max_batch_size: int = 64,
        prefill_chunk: int = 512,
    ):
        if max_batch_size < 1 or prefill_chunk < 1:
            raise ValueError("max_batch_size and prefill_chunk must be >= 1")
        self._model = model
        self._tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk

    @classmethod
    def from_pretrained(
        cls,
        model_dir: Union[str, os.PathLike],
        device: str = "cpu",
        dtype: Union[None, str, torch.dtype] = None,
        block_size: int = 16,
        num_blocks: Optional[int] = None,
        progress: bool = True,
        tokenizer: Union[None, str, os.PathLike, Tokenizer] = None,
        max_batch_size: int = 64,
        prefill_chunk: int = 512,
        mmap: bool = True,
        quantization: Optional[str] = None,
        quantize_activations: bool = False,
    ) -> "Engine":
        """Loads a Hugging Face (config.json) or Mistral consolidated (params.json) directory.

        dtype: on the CPU, the dtype weights are kept in: None keeps the checkpoint's (a bf16
        checkpoint stays bf16, taking its own size in memory), "float32"/"bfloat16"/"float16"
        convert; activations and the KV cache are float32 either way. On CUDA: bfloat16
        (default) or float16, for weights and activations (float32 residual stream).
        mmap: tensors already in their final form are views of the memory-mapped files (the
        files must then stay unchanged while the model is loaded); False copies every weight.
        quantization: None keeps the layer matrices as stored; "int8" (per output channel,
        symmetric) or "int4" (groups of 128 inputs, with zero points) quantizes them at load
        (CPU). AWQ and GPTQ 4-bit checkpoints are detected from config.json and load as they
        are (leave quantization None). Embeddings, norms, the LM head and the router stay float,
        in `dtype`. engine.quantization names the loaded format. quantize_activations=True
        (CPU, quantized weights only) is the fast mode: activations are quantized to int8 per
        row and multiplied in integer arithmetic (llama.cpp's approach), at some accuracy cost.

        block_size: tokens per KV-cache block. num_blocks: blocks in the KV pool (default: room
        for four full-length sequences, capped near 8 GiB). progress: show a progress bar.
        tokenizer: a SentencePiece file or a Tokenizer; by default the directory's own
        (tokenizer.model.v3, tokenizer.model, ...). Without one, prompts must be token ids.
        max_batch_size: sequences decoded together; prefill_chunk: prompt tokens per step.
        """
        if tokenizer is None:
            found = find_tokenizer_file(model_dir) if Path(model_dir).is_dir() else None
            tokenizer = Tokenizer.from_file(found) if found is not None else None
        elif not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer.from_file(tokenizer)
        _prepare_device(device)
        bar = tqdm(total=0, unit="B", unit_scale=True, desc="Loading weights", disable=not progress)

        def report(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            options = _model_options(device, dtype, block_size, num_blocks, mmap)
            options.quantization = quantization
            options.quantize_activations = bool(quantize_activations)
            options.progress = report
            model = _C.Model.load(os.fspath(model_dir), options)
        finally:
            bar.close()
        engine = cls(model, tokenizer, max_batch_size=max_batch_size, prefill_chunk=prefill_chunk)
        if tokenizer is not None and tokenizer.vocab_size > engine.config.vocab_size:
            raise _C.CheckpointError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {engine.config.vocab_size}"
            )
        return engine

    @classmethod
    def from_config(
        cls,
        config: _C.ModelConfig,
        device: str = "cpu",
        dtype: Union[None, str, torch.dtype] = None,
        seed: int = 0,
        block_size: int = 16,
        num_blocks: Optional[int] = None,
        tokenizer: Union[None, str, os.PathLike, Tokenizer] = None,
        quantization: Optional[str] = None,
        quantize_activations: bool = False,
    ) -> "Engine":
        """A model of `config` (e.g. ModelConfig.preset("mistral-7b-v0.1")) with random weights
        drawn from `seed` directly on the device: for benchmarks without a checkpoint. The same
        seed gives the same weights on the CPU and on CUDA (up to the dtype's rounding).
        quantization (None, "int8" or "int4") and quantize_activations: as in from_pretrained (CPU)."""
        _prepare_device(device)
        options = _model_options(device, dtype, block_size, num_blocks, True)
        options.quantization = quantization
        options.quantize_activations = bool(quantize_activations)
        model = _C.Model.from_config(config, seed, options)
        if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer.from_file(tokenizer)
        return cls(model, tokenizer)

    @property
    def config(self) -> _C.ModelConfig:
        return self._model.config

    @property
    def model(self) -> _C.Model:
        return self._model

    @property
    def device(self) -> str:
        return self._model.device

    @property
    def quantization(self) -> Optional[str]:
        """How the layer matrices are held: "awq", "gptq", "int8", "int4", or None (float)."""
        return self._model.quantization

    @property
    def tokenizer(self) -> Optional[Tokenizer]:
        return self._tokenizer

    def _require_tokenizer(self, what: str) -> Tokenizer:
        if self._tokenizer is None:
            raise _C.InvalidRequestError(
                f"{what} needs a tokenizer, and this engine has none: the model directory holds no "
                "tokenizer.model*; pass tokenizer=PATH to Engine.from_pretrained, or give token ids"
            )
        return self._tokenizer

    def _prompt_ids(self, prompts) -> List[List[int]]:
        """A str, a list of str, a list of ids, or a list of id lists -> id lists."""
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise _C.InvalidRequestError("prompts must be a str, a list of str, a list of ids or a list of id lists")
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
            prompts = [list(prompts)]
        result = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                result.append(self._require_tokenizer("a text prompt").encode(prompt, bos=True))
            elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                result.append(list(prompt))
            else:
                raise _C.InvalidRequestError(f"prompt {i} must be a str or a list of int token ids")
        return result

    def _requests(self, prompts, params) -> List[Request]:
        ids = self._prompt_ids(prompts)
        if params is None:
            params = SamplingParams()
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(ids)
        if len(per_prompt) != len(ids):
            raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(ids)} prompts")
        requests = []
        for index, (prompt_ids, p) in enumerate(zip(ids, per_prompt)):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"params must be SamplingParams, got {type(p).__name__}")
            generation.check_prompt(prompt_ids, self.config, index)
            if p.stop_strings:
                self._require_tokenizer("a stop string")
            tok = self._tokenizer
            requests.append(
                Request(
                    index=index,
                    prompt_ids=prompt_ids,
                    params=p,
                    eos_id=tok.eos_id if tok is not None else None,
                    decoder=tok.stream_decoder(prompt_ids) if tok is not None else None,
                )
            )
        return requests

    def _run(self, requests: List[Request]) -> Iterator[Request]:
        return generation.run(self._model, requests, self.max_batch_size, self.prefill_chunk)

    def generate(
        self, prompts, params: Union[None, SamplingParams, Sequence[SamplingParams]] = None
    ) -> List[CompletionOutput]:
        """Completes every prompt (batched together); one CompletionOutput per prompt, in order.

        A str prompt is plain completion: encoded with BOS, no chat template (see chat())."""
        requests = self._requests(prompts, params)
        for _ in self._run(requests):
            pass
        return [request.output() for request in requests]

    def stream(self, prompt: Prompt, params: Optional[SamplingParams] = None) -> "Stream":
        """Iterates over the text deltas of one completion; `.output` holds it once done."""
        requests = self._requests([prompt] if isinstance(prompt, str) else prompt, params)
        if len(requests) != 1:
            raise _C.InvalidRequestError("stream() takes one prompt")
        return Stream(self._run(requests), requests[0])

    def chat(
        self, messages: List[Dict[str, str]], params: Optional[SamplingParams] = None, safe_prompt: bool = False
    ) -> CompletionOutput:
        """Completes the assistant turn after `messages` ([INST] template applied)."""
        ids = self._require_tokenizer("chat").encode_chat(messages, safe_prompt=safe_prompt)
        return self.generate([ids], params)[0]

    def stream_chat(
        self, messages: List[Dict[str, str]], params: Optional[SamplingParams] = None, safe_prompt: bool = False
    ) -> "Stream":
        """chat(), streamed."""
        ids = self._require_tokenizer("chat").encode_chat(messages, safe_prompt=safe_prompt)
        return self.stream(ids, params)

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


class Stream:
    """Text deltas of one completion, as they become final; `.output` once exhausted."""

    def __init__(self, events: Iterator[Request], request: Request):
        self._events = events
        self._request = request
        self.output: Optional[CompletionOutput] = None

    def __iter__(self) -> Iterator[str]:
        for request in self._events:
            delta = request.take_delta()
            if delta:
                yield delta
        self.output = self._request.output()

    def close(self) -> None:
        """Stops early and frees the sequence."""
        self._events.close()
