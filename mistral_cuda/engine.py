"""The Python entry point: load a model directory and run it through the C++ runner."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from mistral_cuda import _C, generation, tool_calls
from mistral_cuda.cuda_libs import preload_cublas
from mistral_cuda.generation import CompletionOutput, Request
from mistral_cuda.guards import ContentFilteredError, as_guards
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


def _model_options(device: str, dtype, block_size: int, num_blocks: Optional[int], limits, **extra) -> _C.ModelOptions:
    """The runner's options; `extra` sets the others by name (mmap, quantization, ...)."""
    options = _C.ModelOptions()
    options.device = device
    options.dtype = _dtype_name(dtype)
    options.block_size = block_size
    options.num_blocks = 0 if num_blocks is None else num_blocks
    options.max_step_seqs, options.max_step_tokens = limits
    for name, value in extra.items():
        setattr(options, name, value)
    return options


def _build_with_bar(desc: str, progress: bool, options: _C.ModelOptions, build) -> _C.Model:
    """build(options), with a loading bar fed by its progress reports (closed whatever happens)."""
    bar = _LoadingBar(desc, progress)
    try:
        options.progress = bar
        return build(options)
    finally:
        bar.close()


def _limits(max_num_seqs, max_num_batched_tokens, max_batch_size, prefill_chunk):
    """(max_num_seqs, max_num_batched_tokens) from the vLLM names or their older aliases."""
    seqs = max_batch_size if max_batch_size is not None else max_num_seqs
    tokens = prefill_chunk if prefill_chunk is not None else max_num_batched_tokens
    for name, value in (("max_num_seqs", seqs), ("max_num_batched_tokens", tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return seqs, max(tokens, seqs)


def _prepare_device(device: str) -> None:
    if device in ("cuda", "auto") and _C.cuda_compiled() and _C.cuda_device_count() > 0:
        preload_cublas()


class InsufficientMemoryError(_C.Error, MemoryError):
    """A model that would not fit the memory this machine has (checked before loading)."""


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is visible to a CUDA build, else "cpu"; others unchanged."""
    if device != "auto":
        return device
    return "cuda" if _C.cuda_compiled() and _C.cuda_device_count() > 0 else "cpu"


def parameter_count(config: _C.ModelConfig) -> int:
    """Weights of a model of `config` (the tensors core/checkpoint.cpp plans)."""
    c = config
    ffn = 3 * c.hidden_dim * c.dim
    if c.n_experts > 0:
        ffn = c.n_experts * ffn + c.n_experts * c.dim  # experts + router
    attention = (2 * c.n_heads + 2 * c.n_kv_heads) * c.head_dim * c.dim
    per_layer = 2 * c.dim + attention + ffn
    head = 0 if c.tie_embeddings else c.vocab_size * c.dim
    return c.vocab_size * c.dim + c.n_layers * per_layer + c.dim + head


def default_num_blocks(config: _C.ModelConfig, block_size: int, dtype_bytes: int) -> int:
    """The runner's default pool (Model::default_num_blocks): four full-length sequences (one
    window's ring each under sliding-window attention), capped near 8 GiB of K/V."""
    return _C.Model.default_num_blocks(config, block_size, "float32" if dtype_bytes == 4 else "bfloat16")


def checkpoint_bytes(model_dir) -> Optional[int]:
    """Bytes of a directory's weight files (what a CPU load keeps resident, dtype unchanged)."""
    files = [p for p in Path(model_dir).glob("*.safetensors") if p.name.startswith(("model", "consolidated"))]
    return sum(p.stat().st_size for p in files) if files else None


def memory_estimate(config: _C.ModelConfig, device: str, dtype: Optional[str], block_size: int,
                    num_blocks: Optional[int], stored_bytes: Optional[int] = None) -> int:
    """Bytes a model needs on `device`: its weights plus the KV-cache pool. The CPU keeps
    weights as stored (stored_bytes, when dtype is None and they are known) and its KV cache
    in float32; CUDA holds both in the half dtype."""
    cpu = resolve_device(device) == "cpu"
    if block_size < 1:
        return 0  # the runner rejects it with its own message
    weight_dtype = dtype or ("float32" if cpu else "bfloat16")
    kv_bytes = 4 if cpu else _DTYPE_BYTES.get(weight_dtype, 2)
    blocks = num_blocks if num_blocks else default_num_blocks(config, block_size, kv_bytes)
    kv = blocks * config.n_layers * 2 * block_size * config.n_kv_heads * config.head_dim * kv_bytes
    if cpu and dtype is None and stored_bytes is not None:
        return stored_bytes + kv
    return parameter_count(config) * _DTYPE_BYTES.get(weight_dtype, 4) + kv


def check_memory_fits(config: _C.ModelConfig, device: str, dtype: Optional[str], block_size: int,
                      num_blocks: Optional[int], stored_bytes: Optional[int] = None) -> None:
    """Raises InsufficientMemoryError when the model would not fit; silent where unknown."""
    need = memory_estimate(config, device, dtype, block_size, num_blocks, stored_bytes)
    have = available_memory(device)
    if have is not None and need > have:
        where = "RAM" if resolve_device(device) == "cpu" else "GPU memory"
        raise InsufficientMemoryError(
            f"this model needs about {need / 2**30:.1f} GiB (weights and KV cache) but only "
            f"{have / 2**30:.1f} GiB of {where} is available; use a smaller model or num_blocks, "
            "another device or dtype, or pass check_memory=False to try anyway"
        )


def available_memory(device: str) -> Optional[int]:
    """Bytes free for a model on `device`: MemAvailable of /proc/meminfo for the CPU, the
    driver's free memory for CUDA where the build exposes it; None where unknown."""
    if resolve_device(device) == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
    mem_get_info = getattr(_C, "cuda_mem_get_info", None)
    return int(mem_get_info()[0]) if mem_get_info is not None else None


class _LoadingBar:
    """A tqdm bar in bytes, created on the first progress report: errors found while the
    directory and headers are checked come before any bar."""

    def __init__(self, desc: str, enabled: bool):
        self._desc = desc
        self._enabled = enabled
        self._bar = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=self._desc,
                             disable=not self._enabled)
        self._bar.total = total
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Engine:
    """A loaded model: `config`, the C++ runner `model`, its `tokenizer`, and generation."""

    def __init__(
        self,
        model: _C.Model,
        tokenizer: Optional[Tokenizer] = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_batch_size: Optional[int] = None,
        prefill_chunk: Optional[int] = None,
    ):
        # A loaded model: the C++ runner, or an object with its interface (tests script one).
        if not isinstance(model, _C.Model) and not all(hasattr(model, a) for a in ("config", "max_step_tokens")):
            raise TypeError(
                f"Engine() takes a loaded model (mistral_cuda._C.Model), not {type(model).__name__} "
                f"{model!r:.80}; to load a model directory use mc.Engine.from_pretrained(path), "
                "for random weights mc.Engine.from_config(config)"
            )
        seqs, tokens = _limits(max_num_seqs, max_num_batched_tokens, max_batch_size, prefill_chunk)
        self._model = model
        self._tokenizer = tokenizer
        # Bounded by the passes the model was loaded for (its workspaces).
        self.max_num_batched_tokens = min(tokens, model.max_step_tokens)
        self.max_num_seqs = min(seqs, self.max_num_batched_tokens)
        self._scheduler: Optional[_C.Scheduler] = None

    @property
    def max_batch_size(self) -> int:
        """The older name of max_num_seqs."""
        return self.max_num_seqs

    @property
    def scheduler(self) -> _C.Scheduler:
        """The core's scheduler every generation of this engine runs on."""
        if self._scheduler is None:
            self._scheduler = _C.Scheduler(self._model, self.max_num_seqs, self.max_num_batched_tokens)
        return self._scheduler

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
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        mmap: bool = True,
        check_memory: bool = True,
        quantization: Optional[str] = None,
        quantize_activations: bool = False,
        max_batch_size: Optional[int] = None,
        prefill_chunk: Optional[int] = None,
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
        tokenizer: a SentencePiece or Tekken file, or a Tokenizer; by default the directory's own
        (tekken.json, tokenizer.model.v3, tokenizer.model, ...). Without one, prompts must be token ids.
        max_num_seqs: sequences the scheduler runs together (alias: max_batch_size);
        max_num_batched_tokens: tokens of one step, decode tokens first and prompt chunks in the
        rest (alias: prefill_chunk).
        check_memory: refuse with InsufficientMemoryError, before loading anything, a model
        whose weights and KV cache exceed the available RAM (CPU) or GPU memory.
        Ctrl-C during the load stops it (KeyboardInterrupt).
        """
        if not isinstance(mmap, bool):
            raise TypeError(f"mmap must be a bool, got {type(mmap).__name__}")
        limits = _limits(max_num_seqs, max_num_batched_tokens, max_batch_size, prefill_chunk)
        config = _C.ModelConfig.from_dir(os.fspath(model_dir))
        dtype_name = _dtype_name(dtype)
        if check_memory:
            check_memory_fits(config, device, dtype_name, block_size, num_blocks, checkpoint_bytes(model_dir))
        if tokenizer is None:
            found = find_tokenizer_file(model_dir) if Path(model_dir).is_dir() else None
            tokenizer = Tokenizer.from_file(found) if found is not None else None
        elif not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer.from_file(tokenizer)
        _prepare_device(device)
        options = _model_options(device, dtype, block_size, num_blocks, limits, mmap=mmap, quantization=quantization,
                                 quantize_activations=bool(quantize_activations))
        model = _build_with_bar("Loading weights", progress, options,
                                lambda o: _C.Model.load(os.fspath(model_dir), o))
        engine = cls(model, tokenizer, *limits)
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
        progress: bool = True,
        check_memory: bool = True,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        quantization: Optional[str] = None,
        quantize_activations: bool = False,
    ) -> "Engine":
        """A model of `config` (e.g. ModelConfig.preset("mistral-7b-v0.1")) with random weights
        drawn from `seed` directly on the device: for benchmarks without a checkpoint. The same
        seed gives the same weights on the CPU and on CUDA (up to the dtype's rounding).
        progress and check_memory as in from_pretrained (the CPU reports drawing progress);
        quantization (None, "int8" or "int4") and quantize_activations: as in from_pretrained (CPU)."""
        if not isinstance(config, _C.ModelConfig):
            raise TypeError(f"config must be a mistral_cuda.ModelConfig, got {type(config).__name__}")
        config.validate()
        dtype_name = _dtype_name(dtype)
        if check_memory:
            check_memory_fits(config, device, dtype_name, block_size, num_blocks)
        _prepare_device(device)
        limits = _limits(max_num_seqs, max_num_batched_tokens, None, None)
        options = _model_options(device, dtype, block_size, num_blocks, limits, quantization=quantization,
                                 quantize_activations=bool(quantize_activations))
        model = _build_with_bar("Drawing random weights", progress, options,
                                lambda o: _C.Model.from_config(config, seed, o))
        if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer.from_file(tokenizer)
        return cls(model, tokenizer, *limits)

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

    def _requests(self, prompts, params, guards: tuple = ()) -> List[List[Request]]:
        """The requests of each prompt: params.n samples each, sharing a seed on distinct streams."""
        ids = self._prompt_ids(prompts)
        if params is None:
            params = SamplingParams()
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(ids)
        if len(per_prompt) != len(ids):
            raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(ids)} prompts")
        tok = self._tokenizer
        # Ids past the tokenizer's vocabulary (a padded embedding) can never be sampled: the
        # generation never produces an id it cannot turn into text.
        vocab_limit = tok.vocab_size if tok is not None and tok.vocab_size < self.config.vocab_size else 0
        groups = []
        for index, (prompt_ids, p) in enumerate(zip(ids, per_prompt)):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"params must be SamplingParams, got {type(p).__name__}")
            generation.check_prompt(prompt_ids, self.config, index)
            if p.stop_strings:
                self._require_tokenizer("a stop string")
            seed = p.seed if p.seed is not None else generation.new_seed()
            groups.append(
                [
                    Request(
                        index=index,
                        prompt_ids=prompt_ids,
                        params=p,
                        eos_id=tok.eos_id if tok is not None else None,
                        decoder=tok.stream_decoder(prompt_ids) if tok is not None else None,
                        seed=seed,
                        sample_index=sample,
                        vocab_limit=vocab_limit,
                        guards=guards,
                    )
                    for sample in range(p.n)
                ]
            )
        return groups

    def _plain_requests(self, prompts, params, guard) -> List[List[Request]]:
        """Requests for plain prompts, once every guard has let each one through (as one user
        message of its text)."""
        guards = as_guards(guard)
        if guards:
            self._require_tokenizer("a guard")
        groups = self._requests(prompts, params, guards)
        for group in groups if guards else ():
            _check_prompt(guards, [{"role": "user", "content": self._tokenizer.decode(group[0].prompt_ids)}])
        return groups

    def _chat_request(self, messages, params, safe_prompt, tools, guard) -> Request:
        tok = self._require_tokenizer("chat")
        ids = tok.encode_chat(messages, safe_prompt=safe_prompt, tools=tools)
        guards = as_guards(guard)
        _check_prompt(guards, list(messages))
        (group,) = self._requests([ids], params, guards)
        if len(group) != 1:
            raise _C.InvalidRequestError("chat takes n=1 (use LLM.chat or generate_requests for n > 1)")
        return group[0]

    def _run(self, groups: List[List[Request]]) -> Iterator[Request]:
        return generation.run(self.scheduler, groups)

    def generate_requests(self, prompts, params=None, guard=None) -> List[List[CompletionOutput]]:
        """Completes every prompt (batched together): the n CompletionOutputs of each prompt."""
        groups = self._plain_requests(prompts, params, guard)
        for _ in self._run(groups):
            pass
        return [[r.output() for r in group] for group in groups]

    def generate(
        self, prompts, params: Union[None, SamplingParams, Sequence[SamplingParams]] = None, guard=None
    ) -> List[CompletionOutput]:
        """Completes every prompt (batched together); one CompletionOutput per prompt, in order
        (with params.n > 1: the list of its n CompletionOutputs).

        A str prompt is plain completion: encoded with BOS, no chat template (see chat()).
        guard: an mc.Guard or a list of them (see chat())."""
        groups = self.generate_requests(prompts, params, guard)
        return [group[0] if len(group) == 1 else group for group in groups]

    def stream(self, prompt: Prompt, params: Optional[SamplingParams] = None, guard=None) -> "Stream":
        """Iterates over the text deltas of one completion; `.output` holds it once done."""
        groups = self._plain_requests([prompt] if isinstance(prompt, str) else prompt, params, guard)
        if len(groups) != 1 or len(groups[0]) != 1:
            raise _C.InvalidRequestError("stream() takes one prompt and n=1")
        requests = groups[0]
        return Stream(self._run([requests]), requests[0])

    def chat(
        self,
        messages: List[dict],
        params: Optional[SamplingParams] = None,
        safe_prompt: bool = False,
        tools: Optional[List[dict]] = None,
        guard=None,
    ) -> CompletionOutput:
        """Completes the assistant turn after `messages` (OpenAI-shaped; templated by
        mistral_common, see Tokenizer.encode_chat), with `tools` (OpenAI-shaped) available.

        A completion that starts with the tool-call token is parsed into `tool_calls`
        (finish_reason "tool_calls"); if it does not parse, it stays `text` and
        `tool_call_error` says why. guard: an mc.Guard or a list of them; a refused prompt
        raises ContentFilteredError, a blocked output ends with finish_reason "content_filter".
        """
        request = self._chat_request(messages, params, safe_prompt, tools, guard)
        for _ in self._run([[request]]):
            pass
        return tool_calls.apply_tool_calls(request.output(), self._tokenizer)

    def stream_chat(
        self,
        messages: List[dict],
        params: Optional[SamplingParams] = None,
        safe_prompt: bool = False,
        tools: Optional[List[dict]] = None,
        guard=None,
    ) -> "ChatStream":
        """chat(), streamed: text deltas, or the tool calls once the completion is complete."""
        request = self._chat_request(messages, params, safe_prompt, tools, guard)
        return ChatStream(self._run([[request]]), request, self._tokenizer)

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
        """Stops early and frees the sequence; `.output` then holds what was produced, with
        finish_reason "abort" unless the completion had already ended."""
        self._events.close()
        if self.output is None:
            self._request.abort()
            self.output = self._request.output()


class ChatStream(Stream):
    """stream_chat(): text deltas (str) as they become final; for a completion that starts with
    the tool-call token, each tool call (an OpenAI-shaped dict) once the completion ends, or its
    text as one delta if it does not parse. `.output` (tool calls parsed) once exhausted."""

    def __init__(self, events: Iterator[Request], request: Request, tokenizer: Tokenizer):
        super().__init__(events, request)
        self._tokenizer = tokenizer

    def __iter__(self) -> Iterator[Union[str, dict]]:
        calling = None
        for request in self._events:
            if calling is None:
                calling = tool_calls.starts_with_tool_call(request.generated, self._tokenizer)
            if not calling:
                delta = request.take_delta()
                if delta:
                    yield delta
        self.output = tool_calls.apply_tool_calls(self._request.output(), self._tokenizer)
        if self.output.tool_calls:
            yield from self.output.tool_calls
        elif calling and self.output.text:
            yield self.output.text


def _check_prompt(guards: tuple, messages: List[dict]) -> None:
    for guard in guards:
        reason = guard.check_prompt(messages)
        if reason is not None:
            raise ContentFilteredError(f"prompt refused by {type(guard).__name__}: {reason}")
