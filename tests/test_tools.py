"""Function calling end to end: tools in the prompt (ids checked against mistral_common), and
tool-call output parsing on well-formed, truncated and malformed completions, produced by a
scripted model (scripted_model.py) so that generation emits exactly the tokens under test."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import mistral_common
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import chat_models as cm
import mistral_cuda as mc
from scripted_model import ScriptedModel, engine_on

DATA = Path(mistral_common.__file__).parent / "data"
FILES = {
    "v2": DATA / "mistral_instruct_tokenizer_240216.model.v2",
    "v3": DATA / "mistral_instruct_tokenizer_240323.model.v3",
    "tekken": DATA / "tekken_240718.json",
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The local time in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
]
ASK = [{"role": "system", "content": "You can call tools."}, {"role": "user", "content": "Weather in Paris?"}]
ID = re.compile(r"[a-zA-Z0-9]{9}")

_cache: dict = {}


def tokenizer(name: str) -> mc.Tokenizer:
    if name not in _cache:
        _cache[name] = mc.Tokenizer.from_file(FILES[name])
    return _cache[name]


def oracle_ids(name: str, messages, tools=None) -> list:
    ref = MistralTokenizer.from_file(str(FILES[name]))
    return ref.encode_chat_completion(ChatCompletionRequest.from_openai(messages, tools=tools)).tokens


def scripted_engine(tok: mc.Tokenizer, prompt_ids, output_ids):
    model = ScriptedModel(tok.vocab_size, tok.eos_id, {tuple(prompt_ids): output_ids})
    return engine_on(model, tok), model


def tool_output(tok: mc.Tokenizer, *payloads: str) -> list:
    """[TOOL_CALLS] payload [TOOL_CALLS] payload ... as a model emits them."""
    ids = []
    for payload in payloads:
        ids += [tok.tool_call_token, *tok.encode(payload, bos=False)]
    return ids


def continuation(tok: mc.Tokenizer, prompt_ids, ids) -> str:
    """The text `ids` add after `prompt_ids` (SentencePiece keeps the space of a first piece)."""
    head = tok.decode(list(prompt_ids))
    return tok.decode(list(prompt_ids) + list(ids))[len(head) :]


def run_both(engine, messages, params, tools=TOOLS):
    """(chat() output, stream_chat() items, stream_chat() output)."""
    out = engine.chat(messages, params, tools=tools)
    stream = engine.stream_chat(messages, params, tools=tools)
    items = list(stream)
    return out, items, stream.output


GREEDY = mc.SamplingParams(max_tokens=200, temperature=0.0)


@pytest.mark.parametrize("name", ["v2", "v3", "tekken"])
def test_tools_in_the_prompt_match_mistral_common(name):
    tok = tokenizer(name)
    assert tok.encode_chat(ASK, tools=TOOLS) == oracle_ids(name, ASK, TOOLS)
    engine, model = scripted_engine(tok, oracle_ids(name, ASK, TOOLS), tok.encode("Sunny.", bos=False))
    out = engine.chat(ASK, GREEDY, tools=TOOLS)
    assert model.prompts_seen[-1][: 4] == oracle_ids(name, ASK, TOOLS)[:4]
    assert out.prompt_token_ids == oracle_ids(name, ASK, TOOLS)
    assert out.text.strip() == "Sunny." and out.text == continuation(tok, out.prompt_token_ids, out.token_ids)
    assert (out.finish_reason, out.tool_calls, out.tool_call_error) == ("stop", None, None)


@pytest.mark.parametrize("name", ["v3", "tekken"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_well_formed_tool_calls(name, temperature):
    tok = tokenizer(name)
    payload = '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}, {"name": "get_time", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]'
    script = tool_output(tok, payload) + [tok.eos_id]
    engine, model = scripted_engine(tok, tok.encode_chat(ASK, tools=TOOLS), script)
    params = mc.SamplingParams(max_tokens=200, temperature=temperature, seed=3)
    out, items, streamed = run_both(engine, ASK, params)
    assert out.token_ids == script
    assert out.finish_reason == "tool_calls" and out.text == "" and out.tool_call_error is None
    calls = out.tool_calls
    assert [c["type"] for c in calls] == ["function", "function"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris", "unit": "C"}, {"city": "Paris"}]
    assert ID.fullmatch(calls[0]["id"]) and calls[1]["id"] == "abcDEF123"  # a valid id is kept
    # streamed: the calls, once complete, and no text
    assert all(isinstance(i, dict) for i in items) and len(items) == 2
    assert [i["function"] for i in items] == [c["function"] for c in calls]
    assert streamed.tool_calls == items and streamed.finish_reason == "tool_calls"
    assert model.live_sequences() == 0

    # The calls go back in OpenAI shape with their results: mistral_common accepts the next turn.
    turn = ASK + [{"role": "assistant", "content": None, "tool_calls": calls}] + [
        {"role": "tool", "tool_call_id": c["id"], "content": "22C" if i == 0 else "14:00"} for i, c in enumerate(calls)
    ]
    assert tok.encode_chat(turn, tools=TOOLS) == oracle_ids(name, turn, TOOLS)


def test_each_tool_call_token_opens_a_list_and_ids_have_the_required_length():
    tok = tokenizer("v3")
    script = tool_output(tok, '[{"name": "get_time", "arguments": {"city": "Oslo"}, "id": "bad-id"}]',
                         '{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}') + [tok.eos_id]  # fmt: skip
    engine, _ = scripted_engine(tok, tok.encode_chat(ASK, tools=TOOLS), script)
    out = engine.chat(ASK, GREEDY, tools=TOOLS)
    assert out.finish_reason == "tool_calls", out.tool_call_error
    assert [c["function"]["name"] for c in out.tool_calls] == ["get_time", "get_weather"]
    assert json.loads(out.tool_calls[1]["function"]["arguments"]) == {"city": "Rome"}
    ids = [c["id"] for c in out.tool_calls]
    assert all(ID.fullmatch(i) for i in ids) and len(set(ids)) == 2  # "bad-id" replaced


@pytest.mark.parametrize("name", ["v3", "tekken"])
def test_truncated_tool_call(name):
    tok = tokenizer(name)
    payload = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    script = tool_output(tok, payload)
    for cut in (1, 4, len(script) - 1):  # just the token; mid-JSON; all but the closing bracket
        engine, _ = scripted_engine(tok, tok.encode_chat(ASK, tools=TOOLS), script + [tok.eos_id])
        out, items, streamed = run_both(engine, ASK, mc.SamplingParams(max_tokens=cut, temperature=0.0))
        assert out.token_ids == script[:cut]
        assert out.finish_reason == "length" and out.tool_calls is None
        assert out.tool_call_error is not None
        assert out.text == continuation(tok, out.prompt_token_ids, script[:cut])  # returned as content
        assert streamed.tool_call_error == out.tool_call_error and streamed.text == out.text
        assert items == ([out.text] if out.text else [])


MALFORMED = {
    "not json": ("get_weather(city='Paris')", "not valid JSON"),
    "a number": ("42", "must be a JSON list"),
    "empty list": ("[]", "must be a JSON list"),
    "list of strings": ('["get_weather"]', "not a JSON object"),
    "no name": ('[{"arguments": {"city": "Paris"}}]', "no function name"),
    "name not a string": ('[{"name": 7, "arguments": {}}]', "no function name"),
    "arguments a list": ('[{"name": "get_weather", "arguments": ["Paris"]}]', "must be a JSON object"),
    "arguments bad string": ('[{"name": "get_weather", "arguments": "{city: Paris"}]', "arguments are not valid JSON"),
    "trailing garbage": ('[{"name": "get_weather", "arguments": {}}] and more', "not valid JSON"),
    "nothing after the token": ("", "not valid JSON"),
}


@pytest.mark.parametrize("name", ["v3", "tekken"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_tool_call_never_raises(name, case):
    payload, reason = MALFORMED[case]
    tok = tokenizer(name)
    script = tool_output(tok, payload) + [tok.eos_id]
    engine, _ = scripted_engine(tok, tok.encode_chat(ASK, tools=TOOLS), script)
    out, items, streamed = run_both(engine, ASK, GREEDY)
    assert out.tool_calls is None and out.finish_reason == "stop"
    assert reason in out.tool_call_error
    assert out.text == continuation(tok, out.prompt_token_ids, script) and out.text.strip() == payload
    assert items == ([out.text] if out.text else []) and streamed.text == out.text
    assert streamed.tool_call_error == out.tool_call_error


@pytest.mark.parametrize("name", ["v3", "tekken"])
def test_text_answers_and_late_tool_tokens_are_content(name):
    tok = tokenizer(name)
    text = "Let me check. "
    script = tok.encode(text, bos=False) + tool_output(tok, '[{"name": "get_time", "arguments": {}}]') + [tok.eos_id]
    engine, _ = scripted_engine(tok, tok.encode_chat(ASK, tools=TOOLS), script)
    out, items, streamed = run_both(engine, ASK, GREEDY)
    # Only a completion that starts with the tool-call token is a call.
    assert out.tool_calls is None and out.tool_call_error is None and out.finish_reason == "stop"
    assert out.text == continuation(tok, out.prompt_token_ids, script)
    assert "".join(items) == out.text == streamed.text
    # generate() is plain completion: never parsed
    engine2, _ = scripted_engine(tok, tok.encode_chat(ASK, tools=TOOLS), tool_output(tok, "[]"))
    (plain,) = engine2.generate([tok.encode_chat(ASK, tools=TOOLS)], GREEDY)
    assert plain.tool_calls is None and plain.tool_call_error is None


def test_v1_has_no_tool_calls():
    tok = mc.Tokenizer.from_file(DATA / "tokenizer.model.v1")
    assert tok.tool_call_token is None
    script = tok.encode('[{"name": "get_time", "arguments": {}}]', bos=False)
    engine, _ = scripted_engine(tok, tok.encode_chat(ASK), script)
    out = engine.chat(ASK, GREEDY, tools=TOOLS)  # mistral_common ignores tools for v1
    assert out.tool_calls is None and out.finish_reason == "stop" and out.text.strip().startswith("[{")


def test_chat_with_tools_on_a_real_tiny_model(tmp_path_factory):
    """The whole path on the C++ runner (a random v3 model): tools in, a completion out."""
    v3 = cm.get_chat_model("v3", tmp_path_factory)
    engine = cm.load_engine(v3)
    params = mc.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    out = engine.chat(ASK, params, tools=TOOLS)
    assert out.prompt_token_ids == oracle_ids("v3", ASK, TOOLS)
    assert len(out.token_ids) == 8 and out.finish_reason in ("length", "tool_calls")
    stream = engine.stream_chat(ASK, params, tools=TOOLS)
    items = list(stream)
    assert stream.output.token_ids == out.token_ids
    if out.tool_calls is None:
        assert "".join(i for i in items if isinstance(i, str)) == out.text


def test_tekken_model_directory_end_to_end(tmp_path_factory):
    """A directory with tekken.json (as Mistral-Nemo ships): the engine finds the tokenizer, chat
    prompts are mistral_common's ids, and the streamed text is the completion's text."""
    tekken = cm.get_chat_model("tekken", tmp_path_factory)
    engine = cm.load_engine(tekken)
    assert engine.tokenizer.is_tekken and engine.tokenizer.vocab_size == engine.config.vocab_size == 131072
    params = mc.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    out = engine.chat(ASK, params, tools=TOOLS)
    assert out.prompt_token_ids == oracle_ids("tekken", ASK, TOOLS)
    stream = engine.stream_chat(ASK, params, tools=TOOLS)
    items = list(stream)
    assert stream.output.token_ids == out.token_ids
    if out.tool_calls is None:
        assert "".join(items) == out.text == engine.tokenizer.decode(out.token_ids)
    (plain,) = engine.generate(["Hello"], params)
    assert plain.prompt_token_ids == engine.tokenizer.encode("Hello")


def test_lone_surrogate_prompts_are_invalid_requests():
    tok = tokenizer("v3")
    engine, model = scripted_engine(tok, tok.encode_chat(ASK), tok.encode("x", bos=False))
    for call in (lambda: engine.chat([{"role": "user", "content": "bad \ud800"}], GREEDY),
                 lambda: engine.stream_chat([{"role": "user", "content": "fine"}], GREEDY,
                                            tools=[{**TOOLS[0], "function": {**TOOLS[0]["function"], "description": "\udc00"}}]),
                 lambda: engine.generate(["bad \ud800"], GREEDY)):  # fmt: skip
        with pytest.raises(mc.InvalidRequestError, match="not valid Unicode"):
            call()
    assert model.prompts_seen == []
