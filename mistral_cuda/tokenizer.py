"""Mistral tokenizers (SentencePiece v1/v2/v3 and Tekken): text, chat templates, streaming decode.

mistral_common, the library Mistral maintains for this, is the template engine: conversations
(OpenAI-shaped messages, tools, tool calls and tool results) are validated, normalized and
encoded by it, so prompt ids are exactly its ids. This module adapts the inputs and errors and
adds what generation needs: plain-text encode/decode and incremental detokenization.
"""

from __future__ import annotations

import codecs
import itertools
import re
from collections.abc import Mapping
from pathlib import Path

import pydantic
import sentencepiece
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, TokenizerVersion
from mistral_common.tokens.tokenizers.instruct import (
    InstructTokenizerV1,
    InstructTokenizerV2,
    InstructTokenizerV3,
)
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from mistral_cuda._C import InvalidRequestError

__all__ = [
    "SAFE_PROMPT",
    "StreamDecoder",
    "TekkenStreamDecoder",
    "Tokenizer",
    "check_unicode",
    "find_tokenizer_file",
]

SUPPORTED_VERSIONS = ("v1", "v2", "v3")
_INSTRUCT_TOKENIZERS = {"v1": InstructTokenizerV1, "v2": InstructTokenizerV2, "v3": InstructTokenizerV3}

# Mistral's guardrail prompt; the API "prepends your messages" with it as a system message.
SAFE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. "
    "Ensure replies promote fairness and positivity."
)

# "tokenizer.model.v3", "mistral_instruct_tokenizer_240323.model.v3", "x.model.v7m1" (m: multimodal)
_VERSIONED_NAME = re.compile(r"\.model\.v(\d+)(?:m\d+)?$")
_REPLACEMENT = "\ufffd"
# Everything mistral_common raises for a conversation it refuses: its own exceptions, pydantic's,
# and the plain KeyError / AssertionError / ... of from_openai's conversion of malformed dicts.
_REJECTIONS = (MistralCommonException, pydantic.ValidationError, ValueError, TypeError, KeyError,
               AttributeError, AssertionError)  # fmt: skip


class Tokenizer:
    """A Mistral tokenizer (SentencePiece or Tekken); build it with `Tokenizer.from_file`.

    `version` is "v1", "v2" or "v3"; `is_tekken` tells the two kinds apart; `tool_call_token`
    is the id of [TOOL_CALLS] (None for v1, which has no function calling).
    """

    def __init__(self, mistral: MistralTokenizer, path: Path | None = None):
        inner = mistral.instruct_tokenizer.tokenizer
        version = inner.version.value
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"{path}: tokenizer version {version} is not supported (supported: v1, v2, v3)"
            )
        self._mistral = mistral
        self._inner = inner
        self.version = version
        self.path = path
        self.is_tekken = isinstance(inner, Tekkenizer)
        self.vocab_size = inner.n_words
        self.bos_id = inner.bos_id
        self.eos_id = inner.eos_id
        self.tool_call_token = None if version == "v1" else inner.get_special_token("[TOOL_CALLS]")
        # SentencePiece only: the processor, for the stream decoder's spacing rules.
        self._sp = None if self.is_tekken else inner._model
        self._anchor = None if self.is_tekken else _find_anchor(self._sp)

    @classmethod
    def from_file(cls, path) -> Tokenizer:
        """Load a SentencePiece model file or a Tekken `tekken.json`.

        A SentencePiece version comes from a `.model.vN` name suffix, else from the vocabulary;
        a Tekken version from the file itself.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        if path.suffix == ".json":
            return cls._from_tekken(path)
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a valid SentencePiece model: {e}") from None
        match = _VERSIONED_NAME.search(path.name)
        if match:
            version = f"v{match.group(1)}"
            if version not in SUPPORTED_VERSIONS:
                raise ValueError(
                    f"{path}: tokenizer version {version} is not supported (supported: v1, v2, v3)"
                )
        else:
            version = _version_from_vocab(sp, path)
        if version != "v1" and not all(_is_control(sp, p) for p in ("[INST]", "[/INST]")):
            raise ValueError(f"{path}: a {version} tokenizer needs [INST] and [/INST] control tokens")
        inner = SentencePieceTokenizer(path, tokenizer_version=TokenizerVersion(version))
        return cls(_assemble(inner, version), path)

    @classmethod
    def _from_tekken(cls, path: Path) -> Tokenizer:
        try:
            inner = Tekkenizer.from_file(path)
        except Exception as e:  # json, schema or tiktoken errors: all mean a bad file
            raise ValueError(f"{path} is not a valid Tekken tokenizer file: {e}") from None
        version = inner.version.value
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"{path}: tokenizer version {version} is not supported (supported: v1, v2, v3)"
            )
        return cls(_assemble(inner, version), path)

    # -- plain text --------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`; control pieces such as "[INST]" typed in text are never produced."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        check_unicode(text, "text")
        return self._inner.encode(text, bos=bos, eos=eos)

    def decode(self, ids) -> str:
        """Text of `ids` with control tokens (BOS, EOS, [INST], ...) dropped."""
        return self._inner.decode(self._checked(ids), special_token_policy=SpecialTokenPolicy.IGNORE)

    def id_to_piece(self, id) -> str:
        return self._inner.id_to_piece(self._checked([id])[0])

    def is_control(self, id) -> bool:
        return self._inner.is_special(self._checked([id])[0])

    def _checked(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"token id {i} is out of range for a vocabulary of {self.vocab_size}"
                )
        return ids

    # -- chat --------------------------------------------------------------------------------

    def encode_chat(self, messages, safe_prompt: bool = False, tools=None) -> list[int]:
        """Prompt ids asking for the next assistant turn of `messages`, as mistral_common
        encodes them.

        `messages`: OpenAI-shaped dicts: {"role": "system" | "user", "content": str or a list of
        {"type": "text", "text": str}}, {"role": "assistant", "content": ..., "tool_calls": [{"id",
        "type": "function", "function": {"name", "arguments"}}]}, {"role": "tool",
        "tool_call_id", "content"}. `tools`: [{"type": "function", "function": {"name",
        "description", "parameters"}}]. safe_prompt: prepend Mistral's guardrail system prompt.
        A conversation mistral_common refuses raises InvalidRequestError with its reason.
        """
        _check_shape(messages, tools)
        if safe_prompt:
            messages = [{"role": "system", "content": SAFE_PROMPT}, *messages]
        try:
            request = ChatCompletionRequest.from_openai(list(messages), tools=tools)
            return self._mistral.encode_chat_completion(request).tokens
        except _REJECTIONS as e:
            raise InvalidRequestError(f"invalid conversation: {_reason(e)}") from None

    def stream_decoder(self, prompt_ids=()) -> StreamDecoder | TekkenStreamDecoder:
        """A decoder for generated tokens that continue `prompt_ids`."""
        if self.is_tekken:
            return TekkenStreamDecoder(self)
        return StreamDecoder(self, prompt_ids)


class StreamDecoder:
    """Incremental detokenizer: push generated ids one at a time, get the text each one completes.

    Each push decodes only a short window: the tokens of the previous chunk (context for spacing)
    plus the tokens not yet emitted.  Text ending in U+FFFD is held back, since byte-fallback
    pieces of a multi-byte character arrive one by one.
    """

    # A valid character is held for at most 3 pushes (its first bytes); longer holds only happen on
    # invalid input, and are released so that the window (and the cost per token) stays bounded.
    _MAX_HELD = 8

    def __init__(self, tokenizer: Tokenizer, prompt_ids=()):
        self._tok = tokenizer
        self._window: list[int] = []  # previous chunk's tokens, then the unemitted ones
        self._read = 0  # start of the unemitted tokens in the window
        # SentencePiece drops the leading space of the first text piece it decodes.  Once text has
        # come before the window, decode behind a fixed anchor piece so that the window's first
        # space survives, as it does when the whole sequence is decoded.
        self._anchored = self._has_text(tokenizer._checked(prompt_ids))

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is incomplete)."""
        self._window += self._tok._checked([token_id])
        prefix = self._text(self._window[: self._read])
        text = self._text(self._window)
        end = len(self._window)
        if text.endswith(_REPLACEMENT):
            if end - self._read <= self._MAX_HELD:
                return ""
            # Invalid bytes: release all but the last 3 tokens, which may still start a character.
            end -= 3
            text = self._text(self._window[:end])
        return self._advance(text[len(prefix) :], end)

    def flush(self) -> str:
        """Return whatever is still held (a truncated character decodes to U+FFFD)."""
        prefix = self._text(self._window[: self._read])
        out = self._text(self._window)[len(prefix) :]
        self._anchored = self._anchored or self._has_text(self._window)
        self._window, self._read = [], 0
        return out

    def _advance(self, out: str, end: int) -> str:
        # The emitted tokens window[read:end] become the context of the next window.
        dropped = self._window[: self._read]
        self._anchored = self._anchored or self._has_text(dropped)
        self._window = self._window[self._read :]
        self._read = end - len(dropped)
        return out

    def _text(self, ids: list[int]) -> str:
        if self._anchored:
            return self._tok._sp.decode([self._tok._anchor, *ids])
        return self._tok._sp.decode(ids)

    def _has_text(self, ids) -> bool:
        # Any non-control piece (even "▁" or a byte) ends SentencePiece's leading-space stripping.
        return any(not self._tok._sp.is_control(i) for i in ids)


class TekkenStreamDecoder:
    """Incremental detokenizer for Tekken (byte-level BPE): push generated ids one at a time, get
    the text each one completes.

    Tokens are byte strings; a UTF-8 decoder holds the bytes of an unfinished character. Special
    tokens carry no text and end a run of bytes, as in `Tokenizer.decode`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is incomplete)."""
        (token_id,) = self._tok._checked([token_id])
        if self._tok._inner.is_special(token_id):
            return self.flush()
        return self._utf8.decode(self._tok._inner.id_to_byte_piece(token_id))

    def flush(self) -> str:
        """Return whatever is still held (a truncated character decodes to U+FFFD)."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out


def find_tokenizer_file(model_dir) -> Path | None:
    """The tokenizer file of a model directory, or None.

    Prefers tekken.json, then tokenizer.model.v3, then the highest tokenizer.model.vN, then
    tokenizer.model.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return None
    for name in ("tekken.json", "tokenizer.model.v3"):
        if (model_dir / name).is_file():
            return model_dir / name
    versioned = []
    for p in model_dir.glob("tokenizer.model.v*"):
        m = re.fullmatch(r"tokenizer\.model\.v(\d+)(?:m(\d+))?", p.name)
        if m and p.is_file():
            versioned.append((int(m.group(1)), int(m.group(2) or 0), p))
    if versioned:
        return max(versioned)[2]
    plain = model_dir / "tokenizer.model"
    return plain if plain.is_file() else None


def check_unicode(text: str, where: str) -> None:
    """Rejects text that is not valid Unicode (a lone surrogate such as "\\ud800"), which no
    tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            f"{where} is not valid Unicode: {text[e.start:e.end]!r} at index {e.start} is a lone "
            "surrogate"
        ) from None


def _assemble(inner, version: str) -> MistralTokenizer:
    # MistralTokenizer.from_file, minus its guess of a SentencePiece version from the file name.
    return MistralTokenizer(
        _INSTRUCT_TOKENIZERS[version](inner),
        validator=get_validator(inner.version, mode=ValidationMode.test),
        request_normalizer=get_normalizer(inner.version, None),
    )


def _is_control(sp: sentencepiece.SentencePieceProcessor, piece: str) -> bool:
    i = sp.piece_to_id(piece)
    return i != sp.unk_id() and sp.is_control(i)


def _version_from_vocab(sp: sentencepiece.SentencePieceProcessor, path: Path) -> str:
    if _is_control(sp, "[SYSTEM_PROMPT]"):
        # v7+ vocabularies, whose chat layout differs; refuse rather than template them as v3.
        raise ValueError(
            f"{path}: looks like a v7 or newer tokenizer, which is not supported (v1, v2, v3)"
        )
    # A v3 vocabulary (with [INST] control tokens) is the newest that has no [SYSTEM_PROMPT].
    return "v3" if _is_control(sp, "[INST]") and _is_control(sp, "[/INST]") else "v1"


def _find_anchor(sp: sentencepiece.SentencePieceProcessor) -> int:
    # A piece that decodes to itself, without a leading space: "a" in every Mistral vocabulary.
    for i in itertools.chain(map(sp.piece_to_id, ("a", "x", ".")), range(sp.vocab_size())):
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)):
            piece = sp.id_to_piece(i)
            if piece and not piece.startswith("\u2581") and sp.decode([i]) == piece:
                return i
    raise ValueError("the vocabulary has no plain text piece")


def _check_shape(messages, tools) -> None:
    """The checks whose failures mistral_common would report obscurely (or not at all): the
    container types, text-only content, and text that is valid Unicode."""
    if not isinstance(messages, (list, tuple)):
        raise InvalidRequestError(f"messages must be a list, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidRequestError(
                f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}"
            )
        if "role" not in m:
            raise InvalidRequestError(f"message {i} has no 'role'")
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            for part in content:
                if not (isinstance(part, Mapping) and part.get("type") == "text"):
                    raise InvalidRequestError(
                        f"message {i}: content parts must be {{'type': 'text', 'text': ...}}, got {part!r}"
                    )
        _check_strings(m, f"message {i}")
    if tools is not None:
        if not isinstance(tools, (list, tuple)):
            raise InvalidRequestError(f"tools must be a list, got {type(tools).__name__}")
        _check_strings(tools, "tools")


def _check_strings(value, where: str) -> None:
    if isinstance(value, str):
        check_unicode(value, where)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _check_strings(k, where)
            _check_strings(v, where)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_strings(v, where)


def _reason(e: Exception) -> str:
    if isinstance(e, pydantic.ValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"{first['msg']} ({where}; {e.error_count()} error(s) in all)"
    if isinstance(e, KeyError):
        return f"missing field {e}"
    return str(e) or type(e).__name__
