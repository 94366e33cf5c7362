"""Function calling output: a completion that starts with [TOOL_CALLS] becomes OpenAI tool calls.

Mistral v2/v3 models answer a call with `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`
(v3 prompts carry call ids; the model may echo one). Parsing never raises: output that does not
parse stays the completion's text, and the reason goes to `CompletionOutput.tool_call_error`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import string
from typing import List, Optional, Sequence, Tuple

from mistral_cuda.generation import CompletionOutput

# v2/v3 validators accept ids of exactly nine ASCII letters or digits, and so must ours be for
# the call to be sent back in the next turn.
TOOL_CALL_ID_LENGTH = 9
_VALID_ID = re.compile(r"[a-zA-Z0-9]{9}")
_ID_ALPHABET = string.ascii_letters + string.digits


def new_tool_call_id() -> str:
    """A fresh id of the form v2/v3 tokenizers require (nine letters or digits)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(TOOL_CALL_ID_LENGTH))


def starts_with_tool_call(token_ids: Sequence[int], tokenizer) -> bool:
    token = getattr(tokenizer, "tool_call_token", None)
    return token is not None and len(token_ids) > 0 and token_ids[0] == token


def parse_tool_calls(token_ids: Sequence[int], tokenizer) -> Tuple[Optional[List[dict]], Optional[str]]:
    """(tool calls, None), or (None, why not) for generated ids that start with [TOOL_CALLS].

    Each [TOOL_CALLS] token opens a JSON list of calls (a single object is taken as a list of one).
    """
    token = tokenizer.tool_call_token
    segments: List[List[int]] = []
    for t in token_ids:
        if t == token:
            segments.append([])
        elif segments:
            segments[-1].append(t)
    calls: List[dict] = []
    for segment in segments:
        text = tokenizer.decode(segment)
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as e:
            return None, f"tool call output is not valid JSON ({e}): {text[:200]!r}"
        if isinstance(payload, dict):
            payload = [payload]
        if not isinstance(payload, list) or not payload:
            return None, f"tool call output must be a JSON list of calls, got {text[:200]!r}"
        for i, call in enumerate(payload):
            parsed, error = _openai_call(call, i)
            if error is not None:
                return None, error
            calls.append(parsed)
    if not calls:
        return None, "no tool call after [TOOL_CALLS]"
    return calls, None


def apply_tool_calls(output: CompletionOutput, tokenizer) -> CompletionOutput:
    """`output` with its tool calls parsed (finish_reason "tool_calls"), when it starts with the
    tool-call token; else unchanged. Blocked output (content_filter) is never parsed."""
    if output.finish_reason == "content_filter" or not starts_with_tool_call(output.token_ids, tokenizer):
        return output
    calls, error = parse_tool_calls(output.token_ids, tokenizer)
    if calls is None:
        return dataclasses.replace(output, tool_call_error=error)
    return dataclasses.replace(output, text="", tool_calls=calls, finish_reason="tool_calls")


def _openai_call(call, index: int) -> Tuple[Optional[dict], Optional[str]]:
    if not isinstance(call, dict):
        return None, f"tool call {index} is not a JSON object: {call!r:.200}"
    name = call.get("name")
    if not isinstance(name, str) or not name:
        return None, f"tool call {index} has no function name: {call!r:.200}"
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models emit the arguments pre-serialized
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None, f"tool call {index} ({name}): arguments are not valid JSON: {arguments!r:.200}"
    if not isinstance(arguments, dict):
        return None, f"tool call {index} ({name}): arguments must be a JSON object, got {arguments!r:.200}"
    call_id = call.get("id")
    if not (isinstance(call_id, str) and _VALID_ID.fullmatch(call_id)):
        call_id = new_tool_call_id()
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }, None
