"""`mistral-cuda serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on an AsyncEngine.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus, vLLM's metric names with the `mistral_cuda:` prefix). Request bodies
are checked strictly: a wrong type, an unknown field or a value out of range is a 400 with
OpenAI's error JSON naming the field, never a 500. Streams are Server-Sent Events exactly as
OpenAI sends them (`data: {json}` events, then `data: [DONE]`). A client that disconnects
aborts its request, which frees its KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mistral_cuda import _C, tool_calls
from mistral_cuda.async_engine import AsyncEngine, QueueFullError, RequestStream
from mistral_cuda.generation import RequestOutput
from mistral_cuda.sampling import MAX_LOGPROBS, SamplingParams, TokenLogprob

MAX_N = 64  # completions per request (each is one sequence in the KV pool)
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Request bodies past this get 413 before they are parsed: far above any prompt the context can
# hold (a 128k-token prompt is ~0.5 MB of text), so that a client cannot make the server buffer
# arbitrary amounts of memory.
MAX_REQUEST_BYTES = 8 << 20


# ---- errors ---------------------------------------------------------------------------------

class APIError(Exception):
    """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def _bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param)


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list|dict|function-\w+)$|\[", re.I)


def _field_path(loc) -> str:
    """A pydantic error location as the field's dotted path, without the union branch tags
    ("prompt.str" -> "prompt") or FastAPI's "body" prefix."""
    return ".".join(str(p) for p in loc if p != "body" and not (isinstance(p, str) and _UNION_TAG.search(p)))


def _validation_error(e: Union[ValidationError, RequestValidationError]) -> APIError:
    errors = e.errors() or [{"loc": (), "msg": "invalid request body", "type": ""}]
    first = errors[0]
    param = _field_path(first.get("loc", ())) or None
    same_field = [err for err in errors if (_field_path(err.get("loc", ())) or None) == param]
    if first.get("type") == "extra_forbidden":
        message = f"unknown field {param!r} (this server rejects fields it does not implement)"
    elif first.get("type") == "missing":
        message = f"missing required field {param!r}"
    else:
        reasons = "; or ".join(dict.fromkeys(str(err.get("msg")) for err in same_field))
        message = f"{param}: {reasons}" if param else reasons
    if len(errors) > len(same_field):
        message += f" ({len(errors)} errors in all)"
    return _bad_request(message, param)


def _engine_error(e: BaseException) -> APIError:
    """What the engine raised for a request, as the client should see it."""
    if isinstance(e, QueueFullError):
        return APIError(503, str(e), type_="service_unavailable_error", code="queue_full")
    if isinstance(e, (ValueError, TypeError, _C.InvalidRequestError)):
        # SamplingParams names the field ("SamplingParams.top_p must be ..."), the core's checks
        # start with it ("logit_bias entry ...", "stop token id ...").
        message = str(e)
        named = re.search(r"SamplingParams\.(\w+)", message)
        field = named.group(1) if named else next(
            (f for key, f in (("logit_bias", "logit_bias"), ("stop token id", "stop_token_ids")) if message.startswith(key)),
            None)
        return _bad_request(message.replace("SamplingParams.", ""), field)
    return APIError(500, f"internal error: {e}", type_="internal_server_error")


# ---- request bodies -------------------------------------------------------------------------

class _Strict(BaseModel):
    # Strict types ("1" is not an int) and no unknown fields: a client's typo is a 400 naming
    # the field, not a silently ignored parameter.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: Optional[bool] = None


class _SamplingFields(_Strict):
    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=0, le=2**64 - 1)
    stop: Union[None, str, List[str]] = None
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[Dict[str, float]] = None
    user: Optional[str] = None
    # vLLM's extra sampling fields
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False


class ChatCompletionRequest(_SamplingFields):
    messages: List[Dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Union[None, Literal["none", "auto"]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[Dict[str, Any]] = None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, List[int]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Literal[False] = False
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N)
    suffix: Optional[str] = None


async def _read_body(raw: Request) -> bytes:
    """The request's body, refused with 413 once it is known to exceed MAX_REQUEST_BYTES (from
    Content-Length, or while it streams in)."""
    too_large = APIError(413, f"the request body exceeds {MAX_REQUEST_BYTES} bytes", param="body")
    declared = raw.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in raw.stream():
        body += chunk
        if len(body) > MAX_REQUEST_BYTES:
            raise too_large
    return bytes(body)


def _parse(model: type, body: bytes):
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
        raise _bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise _bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


def _sampling_params(req: _SamplingFields, max_tokens: int, logprobs: Optional[int]) -> SamplingParams:
    bias = None
    if req.logit_bias is not None:
        try:
            bias = {int(k): v for k, v in req.logit_bias.items()}
        except ValueError:
            raise _bad_request("logit_bias keys must be token ids", "logit_bias") from None
    try:
        return SamplingParams(
            n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=bias, seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
            include_stop_str_in_output=req.include_stop_str_in_output, logprobs=logprobs,
            ignore_eos=req.ignore_eos,
        )
    except ValueError as e:
        raise _engine_error(e) from None


# ---- metrics --------------------------------------------------------------------------------

# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards built for it read these the same.
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0]
_E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0]


class _EngineCounter:
    """A counter read from the engine's own count at each scrape (the scheduler thread counts;
    vLLM's num_preemptions and generation_tokens, which grow as steps run, not as requests end)."""

    def __init__(self, engine: AsyncEngine, model_name: str, name: str, doc: str, field: str):
        self._engine, self._model_name = engine, model_name
        self._name, self._doc, self._field = name, doc, field

    def collect(self):
        family = CounterMetricFamily(self._name, self._doc, labels=["model_name"])
        family.add_metric([self._model_name], getattr(self._engine.stats, self._field))
        yield family


class Metrics:
    """Prometheus metrics on a private registry, named as vLLM names them (vllm: -> mistral_cuda:),
    each labelled with model_name."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str, read) -> None:
            Gauge(name, doc, labels, registry=r).labels(model_name).set_function(read)

        gauge("mistral_cuda:num_requests_running", "Sequences in the running batch.",
              lambda: engine.stats.num_running)
        gauge("mistral_cuda:num_requests_waiting", "Sequences admitted and waiting to run.",
              lambda: engine.num_waiting)
        gauge("mistral_cuda:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = all).",
              lambda: engine.stats.kv_cache_usage)
        self.ttft = Histogram("mistral_cuda:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("mistral_cuda:inter_token_latency_seconds", "Time between tokens.", labels,
                             buckets=_ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("mistral_cuda:e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             buckets=_E2E_BUCKETS, registry=r).labels(model_name)
        self.prompt_tokens = Counter("mistral_cuda:prompt_tokens", "Prefill tokens processed.", labels,
                                     registry=r).labels(model_name)
        self._success = Counter("mistral_cuda:request_success", "Requests finished, by finish reason.",
                                labels + ["finished_reason"], registry=r)
        self._model_name = model_name
        r.register(_EngineCounter(engine, model_name, "mistral_cuda:num_preemptions",
                                  "Requests preempted (recomputed later).", "preemptions"))
        r.register(_EngineCounter(engine, model_name, "mistral_cuda:generation_tokens",
                                  "Generation tokens produced.", "generation_tokens"))

    def observe(self, stream: RequestStream, last: Optional[RequestOutput]) -> None:
        """Records a request that ended (finished, aborted or failed)."""
        m = stream.metrics
        if m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
        for gap in m.inter_token_latencies:
            self.itl.observe(gap)
        if last is None:
            return
        if last.finished and all(o.finish_reason != "abort" for o in last.outputs):
            self.e2e.observe((m.finished_time or time.perf_counter()) - m.arrival_time)
            for o in last.outputs:
                self._success.labels(self._model_name, o.finish_reason).inc()


# ---- responses ------------------------------------------------------------------------------

def _token_text(tokenizer, token: int) -> str:
    """A token's text as OpenAI shows it in logprobs: SentencePiece's word marker as a space,
    a byte piece <0xNN> as that byte (one invalid UTF-8 byte shows as U+FFFD)."""
    piece = tokenizer.id_to_piece(token)
    byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
    if byte:
        return bytes([int(byte.group(1), 16)]).decode("utf-8", errors="replace")
    return piece.replace("\u2581", " ")


def _top(entry: TokenLogprob, k: int) -> List[tuple]:
    """The k most likely (id, logprob) (the sampled token was added to the core's list only when
    outside its top k)."""
    ranked = sorted(entry.top_logprobs.items(), key=lambda kv: -kv[1])
    if entry.rank > k:
        ranked = [kv for kv in ranked if kv[0] != entry.token_id]
    return ranked[:k]


def _chat_logprobs(tokenizer, entries: List[TokenLogprob], k: int) -> dict:
    def item(token: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [dict(item(e.token_id, e.logprob), top_logprobs=[item(t, lp) for t, lp in _top(e, k)])
                        for e in entries]}


def _completion_logprobs(tokenizer, entries: List[TokenLogprob], k: int, offset: int) -> dict:
    tokens = [_token_text(tokenizer, e.token_id) for e in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{_token_text(tokenizer, t): lp for t, lp in _top(e, k)} for e in entries],
        "text_offset": offsets,
    }


def _usage(prompt_tokens: int, last: Optional[RequestOutput]) -> dict:
    completion = sum(len(o.token_ids) for o in last.outputs) if last is not None else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Choice:
    """What of one completion a stream has sent so far."""

    def __init__(self):
        self.text = 0
        self.tokens = 0
        self.text_offset = 0
        self.calling: Optional[bool] = None   # chat: the completion starts with a tool call
        self.done = False


class OpenAIServer:
    """The routes' logic over one AsyncEngine."""

    def __init__(self, engine: AsyncEngine, model_name: str, api_key: Optional[str]):
        if engine.tokenizer is None:
            raise _C.InvalidRequestError("serving needs a tokenizer: the model directory holds none; pass --tokenizer")
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.metrics = Metrics(engine, model_name)
        self.created = int(time.time())

    # -- shared checks ---------------------------------------------------------------------

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           param=None, code="invalid_api_key")

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def _max_tokens(self, requested: Optional[int], prompt_len: int, default: Optional[int]) -> int:
        """max_tokens checked against the model's context (vLLM's rule: prompt + max_tokens must
        fit max_seq_len); None takes `default`, or all the room left."""
        limit = self.engine.config.max_seq_len
        if prompt_len >= limit:
            raise _bad_request(f"the prompt has {prompt_len} tokens; this model's context is {limit} tokens",
                               "messages" if default is None else "prompt")
        if requested is None:
            return min(default, limit - prompt_len) if default is not None else limit - prompt_len
        if prompt_len + requested > limit:
            raise _bad_request(
                f"this model's maximum context length is {limit} tokens, but {prompt_len} prompt tokens and "
                f"max_tokens {requested} were requested", "max_tokens")
        return requested

    async def _start(self, prompt_ids: List[int], params: SamplingParams, request_id: str) -> RequestStream:
        try:
            stream = await self.engine.add_request(prompt_ids, params, request_id)
        except Exception as e:  # noqa: BLE001 - turned into the client's error status
            raise _engine_error(e) from None
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        return stream

    # -- chat ------------------------------------------------------------------------------

    async def chat(self, raw: Request) -> Response:
        req: ChatCompletionRequest = _parse(ChatCompletionRequest, await _read_body(raw))
        self._check_model(req.model)
        if req.response_format is not None and req.response_format != {"type": "text"}:
            raise _bad_request("only response_format {'type': 'text'} is supported", "response_format")
        tokenizer = self.engine.tokenizer
        tools = req.tools if req.tool_choice != "none" else None
        try:
            prompt_ids = tokenizer.encode_chat(req.messages, tools=tools)
        except (_C.InvalidRequestError, ValueError, TypeError) as e:
            raise _bad_request(str(e), "messages") from None
        if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
            raise _bad_request("max_tokens and max_completion_tokens differ; send one", "max_completion_tokens")
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self._max_tokens(requested, len(prompt_ids), None)
        if req.top_logprobs is not None and not req.logprobs:
            raise _bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        k = req.top_logprobs or 0
        params = _sampling_params(req, max_tokens, k if req.logprobs else None)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await self._start(prompt_ids, params, request_id)
        meta = {"id": request_id, "created": int(time.time()), "model": self.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._sse_response(self._chat_events(stream, meta, len(prompt_ids), k if req.logprobs else None,
                                                        include_usage))
        last = await self._collect(raw, stream)
        if last is None:
            return Response(status_code=499)
        choices = []
        for o in last.outputs:
            o = tool_calls.apply_tool_calls(o, tokenizer)
            message: Dict[str, Any] = {"role": "assistant", "content": o.text if not o.tool_calls else None}
            if o.tool_calls:
                message["tool_calls"] = o.tool_calls
            choices.append({
                "index": o.index, "message": message,
                "logprobs": _chat_logprobs(tokenizer, o.logprobs, k) if req.logprobs else None,
                "finish_reason": o.finish_reason,
            })
        return JSONResponse({**meta, "object": "chat.completion", "choices": choices,
                             "usage": _usage(len(prompt_ids), last)})

    async def _chat_events(self, stream: RequestStream, meta: dict, prompt_len: int, k: Optional[int],
                           include_usage: bool) -> AsyncIterator[str]:
        tokenizer = self.engine.tokenizer
        base = {**meta, "object": "chat.completion.chunk"}
        extra = {"usage": None} if include_usage else {}
        n = stream.n
        sent = [_Choice() for _ in range(n)]

        def chunk(index: int, delta: dict, logprobs=None, finish=None) -> str:
            return _sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                              "finish_reason": finish}], **extra})

        async def events(last_box: list) -> AsyncIterator[str]:
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for out in stream:
                last_box[0] = out
                for o in out.outputs:
                    s = sent[o.index]
                    if s.done:
                        continue
                    if s.calling is None and o.token_ids:
                        s.calling = tool_calls.starts_with_tool_call(o.token_ids, tokenizer)
                    new_entries = (o.logprobs or [])[s.tokens:] if k is not None else []
                    s.tokens = len(o.token_ids)
                    finish = o.finish_reason
                    if s.calling:
                        if finish is None:
                            continue
                        o = tool_calls.apply_tool_calls(o, tokenizer)
                        delta = ({"tool_calls": [dict(call, index=j) for j, call in enumerate(o.tool_calls)]}
                                 if o.tool_calls else {"content": o.text})
                        finish = o.finish_reason
                        new_entries = o.logprobs if k is not None else []
                    else:
                        delta = {"content": o.text[s.text:]}
                        s.text = len(o.text)
                    if not delta.get("content") and "tool_calls" not in delta and not new_entries and finish is None:
                        continue
                    logprobs = _chat_logprobs(tokenizer, new_entries, k) if k is not None else None
                    s.done = finish is not None
                    yield chunk(o.index, delta, logprobs, finish)
            if include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(prompt_len, last_box[0])})

        async for event in self._guarded(stream, events):
            yield event

    # -- completions -------------------------------------------------------------------------

    async def completions(self, raw: Request) -> Response:
        req: CompletionRequest = _parse(CompletionRequest, await _read_body(raw))
        self._check_model(req.model)
        if req.best_of is not None and req.best_of != req.n:
            raise _bad_request("best_of must equal n (no server-side ranking)", "best_of")
        if req.suffix:
            raise _bad_request("suffix is not supported", "suffix")
        tokenizer = self.engine.tokenizer
        if isinstance(req.prompt, str):
            if not req.prompt:
                raise _bad_request("prompt is empty", "prompt")
            try:
                prompt_ids = tokenizer.encode(req.prompt, bos=True)  # as Engine.generate encodes a str
            except (_C.InvalidRequestError, ValueError) as e:  # e.g. a lone surrogate
                raise _bad_request(str(e), "prompt") from None
        else:
            prompt_ids = list(req.prompt)
            vocab = self.engine.config.vocab_size
            bad = [t for t in prompt_ids if not 0 <= t < vocab]
            if not prompt_ids or bad:
                raise _bad_request(f"prompt token ids must be a non-empty list in [0, {vocab})", "prompt")
        max_tokens = self._max_tokens(req.max_tokens, len(prompt_ids), DEFAULT_COMPLETION_MAX_TOKENS)
        params = _sampling_params(req, max_tokens, req.logprobs)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        stream = await self._start(prompt_ids, params, request_id)
        meta = {"id": request_id, "created": int(time.time()), "model": self.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._sse_response(self._completion_events(stream, meta, len(prompt_ids), req.logprobs,
                                                              include_usage))
        last = await self._collect(raw, stream)
        if last is None:
            return Response(status_code=499)
        choices = [{
            "index": o.index, "text": o.text,
            "logprobs": _completion_logprobs(tokenizer, o.logprobs, req.logprobs, 0) if req.logprobs is not None else None,
            "finish_reason": o.finish_reason,
        } for o in last.outputs]
        return JSONResponse({**meta, "object": "text_completion", "choices": choices,
                             "usage": _usage(len(prompt_ids), last)})

    async def _completion_events(self, stream: RequestStream, meta: dict, prompt_len: int, k: Optional[int],
                                 include_usage: bool) -> AsyncIterator[str]:
        tokenizer = self.engine.tokenizer
        base = {**meta, "object": "text_completion"}
        extra = {"usage": None} if include_usage else {}
        sent = [_Choice() for _ in range(stream.n)]

        async def events(last_box: list) -> AsyncIterator[str]:
            async for out in stream:
                last_box[0] = out
                for o in out.outputs:
                    s = sent[o.index]
                    if s.done:
                        continue
                    text = o.text[s.text:]
                    entries = (o.logprobs or [])[s.tokens:]
                    s.text, s.tokens = len(o.text), len(o.token_ids)
                    if not text and not (k is not None and entries) and o.finish_reason is None:
                        continue
                    logprobs = None
                    if k is not None:
                        logprobs = _completion_logprobs(tokenizer, entries, k, s.text_offset)
                        s.text_offset += sum(len(t) for t in logprobs["tokens"])
                    s.done = o.finish_reason is not None
                    yield _sse({**base, "choices": [{"index": o.index, "text": text, "logprobs": logprobs,
                                                     "finish_reason": o.finish_reason}], **extra})
            if include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(prompt_len, last_box[0])})

        async for event in self._guarded(stream, events):
            yield event

    # -- plumbing ----------------------------------------------------------------------------

    def _sse_response(self, events: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _guarded(self, stream: RequestStream, events) -> AsyncIterator[str]:
        """The events, then [DONE]; an engine failure mid-stream ends it with an error event.
        However it ends (a disconnect cancels it), the request is aborted if unfinished and
        recorded in the metrics."""
        last_box: List[Optional[RequestOutput]] = [None]
        try:
            async for event in events(last_box):
                yield event
            yield "data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 - the headers are sent: report it in the stream
            error = _engine_error(e)
            yield _sse({"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}})
        finally:
            stream.abort()
            self.metrics.observe(stream, last_box[0])

    async def _collect(self, raw: Request, stream: RequestStream) -> Optional[RequestOutput]:
        """The final output; None if the client disconnected first (the request is aborted)."""
        async def last_output() -> Optional[RequestOutput]:
            last = None
            async for out in stream:
                last = out
            return last

        async def disconnected() -> None:
            while (await raw.receive())["type"] != "http.disconnect":
                pass

        work = asyncio.ensure_future(last_output())
        watch = asyncio.ensure_future(disconnected())
        last = None
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                last = work.result()
                return last
            return None
        except Exception as e:  # noqa: BLE001
            raise _engine_error(e) from None
        finally:
            for task in (work, watch):
                task.cancel()
            stream.abort()
            self.metrics.observe(stream, last)

    def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "mistral_cuda",
            "max_model_len": self.engine.config.max_seq_len,
        }]}


def build_app(engine: AsyncEngine, model_name: str, api_key: Optional[str] = None) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`; with api_key, every route but /health
    requires `Authorization: Bearer <api_key>`. The engine is shut down with the app."""
    server = OpenAIServer(engine, model_name, api_key)

    async def lifespan(app: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="mistral_cuda", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return _validation_error(e).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), type_=kind).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type_="internal_server_error").response()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        server.check_key(request)
        return await server.chat(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        server.check_key(request)
        return await server.completions(request)

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_key(request)
        return server.models()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        server.check_key(request)
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def run_server(args) -> int:
    """`mistral-cuda serve` with its parsed (and checked) arguments."""
    import uvicorn

    engine = AsyncEngine.from_pretrained(
        args.model_dir, device=args.device, dtype=None if args.dtype == "auto" else args.dtype,
        num_blocks=args.num_blocks, tokenizer=args.tokenizer, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_waiting_requests=args.max_waiting_requests,
    )
    name = args.served_model_name or Path(args.model_dir).resolve().name
    app = build_app(engine, name, args.api_key)
    print(f"mistral-cuda: serving {name!r} on http://{args.host}:{args.port}/v1 "
          f"({engine.engine.device}, {engine.stats.num_blocks} KV blocks"
          f"{', API key required' if args.api_key else ''})", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.shutdown()
    return 0
