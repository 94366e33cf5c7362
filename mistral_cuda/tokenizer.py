"""SentencePiece tokenizer for Mistral models: text, chat templates (v1-v3), streaming decode.

For plain-text system/user/assistant messages, the chat layout reproduces mistral_common's
`MistralTokenizer.encode_chat_completion` token for token, without depending on mistral_common.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from pathlib import Path

import sentencepiece

from mistral_cuda._C import InvalidRequestError

__all__ = ["SAFE_PROMPT", "StreamDecoder", "Tokenizer", "find_tokenizer_file"]

SUPPORTED_VERSIONS = ("v1", "v2", "v3")

# Mistral's guardrail prompt; the API "prepends your messages" with it as a system message.
SAFE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. "
    "Ensure replies promote fairness and positivity."
)

# "tokenizer.model.v3", "mistral_instruct_tokenizer_240323.model.v3", "x.model.v7m1" (m: multimodal)
_VERSIONED_NAME = re.compile(r"\.model\.v(\d+)(?:m\d+)?$")
_ROLES = ("system", "user", "assistant")
# Separator of merged messages and of joined system prompts, as in mistral_common's normalizer.
_JOIN = "\n\n"
_REPLACEMENT = "\ufffd"


class Tokenizer:
    """A Mistral SentencePiece tokenizer; build it with `Tokenizer.from_file`."""

    def __init__(
        self, sp: sentencepiece.SentencePieceProcessor, version: str, path: Path | None = None
    ):
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"tokenizer version {version!r} is not supported (supported: v1, v2, v3)"
            )
        self._sp = sp
        self.version = version
        self.path = path
        self.vocab_size = sp.vocab_size()
        self.bos_id = sp.bos_id()
        self.eos_id = sp.eos_id()
        if version != "v1":
            self._inst = sp.piece_to_id("[INST]")
            self._end_inst = sp.piece_to_id("[/INST]")
            if not (sp.is_control(self._inst) and sp.is_control(self._end_inst)):
                raise ValueError(
                    f"{path}: a {version} tokenizer needs [INST] and [/INST] control tokens"
                )
        self._anchor = _find_anchor(sp)

    @classmethod
    def from_file(cls, path) -> Tokenizer:
        """Load a SentencePiece model file.

        The version comes from a `.model.vN` name suffix, else from the vocabulary.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
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
        return cls(sp, version, path)

    # -- plain text --------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`; control pieces such as "[INST]" typed in text are never produced."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """Text of `ids` with control tokens (BOS, EOS, [INST], ...) dropped."""
        return self._sp.decode(self._checked(ids))

    def id_to_piece(self, id) -> str:
        return self._sp.id_to_piece(self._checked([id])[0])

    def is_control(self, id) -> bool:
        return self._sp.is_control(self._checked([id])[0])

    def _checked(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"token id {i} is out of range for a vocabulary of {self.vocab_size}"
                )
        return ids

    # -- chat --------------------------------------------------------------------------------

    def encode_chat(self, messages, safe_prompt: bool = False) -> list[int]:
        """Prompt ids asking for the next assistant turn of `messages`.

        `messages` is a list of {"role": "system" | "user" | "assistant", "content": str}.
        """
        messages = _validated(messages)
        if safe_prompt:
            messages = [("system", SAFE_PROMPT)] + messages
        system_prompt, turns = _normalized(messages)
        users = [i for i, (role, _) in enumerate(turns) if role == "user"]
        # v1 puts the system prompt on the first user turn, v2/v3 on the last one.
        sys_turn = users[0] if self.version == "v1" else users[-1]
        ids = [self.bos_id]
        for i, (role, text) in enumerate(turns):
            if role == "user":
                if i == sys_turn and system_prompt:
                    text = system_prompt + _JOIN + text
                if self.version == "v1":
                    # v1 has no control tokens: the markers are plain text.
                    ids += self._sp.encode(f"[INST] {text} [/INST]")
                else:
                    ids += [self._inst, *self._sp.encode(text), self._end_inst]
            else:
                # v2+ drop trailing spaces of assistant turns, v1 keeps them.
                ids += self._sp.encode(text if self.version == "v1" else text.rstrip(" "))
                ids.append(self.eos_id)
        return ids

    def stream_decoder(self, prompt_ids=()) -> StreamDecoder:
        """A decoder for generated tokens that continue `prompt_ids`."""
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


def find_tokenizer_file(model_dir) -> Path | None:
    """The tokenizer file of a model directory, or None.

    Prefers tokenizer.model.v3, then the highest tokenizer.model.vN, then tokenizer.model.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return None
    if (model_dir / "tokenizer.model.v3").is_file():
        return model_dir / "tokenizer.model.v3"
    versioned = []
    for p in model_dir.glob("tokenizer.model.v*"):
        m = re.fullmatch(r"tokenizer\.model\.v(\d+)(?:m(\d+))?", p.name)
        if m and p.is_file():
            versioned.append((int(m.group(1)), int(m.group(2) or 0), p))
    if versioned:
        return max(versioned)[2]
    plain = model_dir / "tokenizer.model"
    return plain if plain.is_file() else None


def _version_from_vocab(sp: sentencepiece.SentencePieceProcessor, path: Path) -> str:
    def control(piece: str) -> bool:
        i = sp.piece_to_id(piece)
        return i != sp.unk_id() and sp.is_control(i)

    if control("[SYSTEM_PROMPT]"):
        # v7+ vocabularies, whose chat layout differs; refuse rather than template them as v3.
        raise ValueError(
            f"{path}: looks like a v7 or newer tokenizer, which is not supported (v1, v2, v3)"
        )
    # v2 and v3 lay out text-only chats identically, so a v2 vocabulary is safely treated as v3.
    return "v3" if control("[INST]") and control("[/INST]") else "v1"


def _find_anchor(sp: sentencepiece.SentencePieceProcessor) -> int:
    # A piece that decodes to itself, without a leading space: "a" in every Mistral vocabulary.
    for i in itertools.chain(map(sp.piece_to_id, ("a", "x", ".")), range(sp.vocab_size())):
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)):
            piece = sp.id_to_piece(i)
            if piece and not piece.startswith("\u2581") and sp.decode([i]) == piece:
                return i
    raise ValueError("the vocabulary has no plain text piece")


def _validated(messages) -> list[tuple[str, str]]:
    """(role, content) pairs, rejecting what mistral_common rejects and conversations it would not
    continue with an assistant turn."""
    if not isinstance(messages, (list, tuple)):
        raise InvalidRequestError(f"messages must be a list, got {type(messages).__name__}")
    if not messages:
        raise InvalidRequestError("conversation must have at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidRequestError(
                f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}"
            )
        for key in ("role", "content"):
            if key not in m:
                raise InvalidRequestError(f"message {i} has no '{key}'")
        role, content = m["role"], m["content"]
        if role not in _ROLES:
            raise InvalidRequestError(
                f"message {i} has unsupported role {role!r} (expected system, user or assistant)"
            )
        if not isinstance(content, str):
            raise InvalidRequestError(
                f"message {i} ({role}): content must be a str, got {type(content).__name__}"
            )
        if role == "assistant" and not content:
            raise InvalidRequestError(f"message {i}: assistant message content must not be empty")
        if role == "system" and out and out[-1][0] == "assistant":
            raise InvalidRequestError(
                f"message {i}: a system message cannot follow an assistant message"
            )
        out.append((role, content))
    turns = [role for role, _ in out if role != "system"]
    if turns and turns[0] == "assistant":
        raise InvalidRequestError(
            "conversation must start with a user message (after any system messages)"
        )
    if out[-1][0] == "assistant":
        raise InvalidRequestError(
            "conversation must end with a user message, not an assistant message"
        )
    return out


def _normalized(messages: list[tuple[str, str]]) -> tuple[str | None, list[tuple[str, str]]]:
    """(system prompt, turns) as mistral_common's normalizer builds them.

    All system messages are joined into one prompt; each run of same-role messages is merged into
    one turn (a system message in between ends a run); empty texts are skipped when joining.
    """
    system = [c for r, c in messages if r == "system" and c]
    turns: list[tuple[str, list[str]]] = []
    prev = None
    for role, content in messages:
        if role != "system":
            if role != prev:
                turns.append((role, []))
            if content:
                turns[-1][1].append(content)
        prev = role
    merged = [(role, _JOIN.join(parts)) for role, parts in turns]
    if not merged:  # only system messages: they still need a user turn to sit in
        merged = [("user", "")]
    return (_JOIN.join(system) if system else None), merged
