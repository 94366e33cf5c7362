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


def _model_options(
    device: str, dtype, block_size: int, num_blocks: Optional[int], mmap: bool, limits=(64, 2048)
) -> _C.ModelOptions:
    options = _C.ModelOptions()
    options.device = device
    options.dtype = _dtype_name(dtype)
    options.block_size = block_size
    options.num_blocks = 0 if num_blocks is None else num_blocks
    options.mmap = bool(mmap)
    options.max_step_seqs, options.max_step_tokens = limits
    return options


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

        block_size: tokens per KV-cache block. num_blocks: blocks in the KV pool (default: room
        for four full-length sequences, capped near 8 GiB). progress: show a progress bar.
        tokenizer: a SentencePiece or Tekken file, or a Tokenizer; by default the directory's own
        (tekken.json, tokenizer.model.v3, tokenizer.model, ...). Without one, prompts must be token ids.
        max_num_seqs: sequences the scheduler runs together (alias: max_batch_size);
        max_num_batched_tokens: tokens of one step, decode tokens first and prompt chunks in the
        rest (alias: prefill_chunk).
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
            limits = _limits(max_num_seqs, max_num_batched_tokens, max_batch_size, prefill_chunk)
            options = _model_options(device, dtype, block_size, num_blocks, mmap, limits)
            options.progress = report
            model = _C.Model.load(os.fspath(model_dir), options)
        finally:
            bar.close()
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
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
    ) -> "Engine":
        """A model of `config` (e.g. ModelConfig.preset("mistral-7b-v0.1")) with random weights
        drawn from `seed` directly on the device: for benchmarks without a checkpoint. The same
        seed gives the same weights on the CPU and on CUDA (up to the dtype's rounding)."""
        _prepare_device(device)
        limits = _limits(max_num_seqs, max_num_batched_tokens, None, None)
        model = _C.Model.from_config(config, seed, _model_options(device, dtype, block_size, num_blocks, True, limits))
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

    def _run(self, requests: List[Request]) -> Iterator[Request]:
        return generation.run(self.scheduler, requests)

    def generate_requests(self, prompts, params=None, guard=None) -> List[List[CompletionOutput]]:
        """Completes every prompt (batched together): the n CompletionOutputs of each prompt."""
        groups = self._plain_requests(prompts, params, guard)
        for _ in self._run([r for group in groups for r in group]):
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
        return Stream(self._run(requests), requests[0])

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
        for _ in self._run([request]):
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
        return ChatStream(self._run([request]), request, self._tokenizer)

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
        """Stops early and frees the sequence; `.output` then holds what was produced
        (finish_reason "abort" unless it had finished)."""
        self._events.close()
        if self.output is None:
            self._request._finish("abort")
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
