"""Tiny random Mistral checkpoints that ship with a real Mistral tokenizer, for the
generation-layer tests (sampling, generate/stream/chat, CLI).

* ``v1``: vocab 32000 with mistral_common's ``tokenizer.model.v1`` copied to
  ``tokenizer.model``.
* ``v3``: vocab 32768 with ``mistral_instruct_tokenizer_240323.model.v3`` copied to
  ``tokenizer.model.v3``.
* ``tekken``: vocab 131072 with mistral_common's ``tekken_240718.json`` copied to
  ``tekken.json`` (a Mistral-Nemo-style directory).
* ``notok``: the v1 weights in a directory without any tokenizer file.
* ``eos``: the v1 model with the LM-head rows of EOS and of one token that greedy decoding
  of ``EOS_PROMPT_IDS`` emits swapped, so that greedy decoding of that prompt emits EOS at a
  known step (found and checked with transformers, independently of the engine).

All are built once per test session (memoised here, not in fixtures, so that several test
modules importing the getters share one build) under pytest's ``tmp_path_factory``.

The models: hidden 64, 2 layers, 4 heads / 2 KV heads, sliding window 16 (generation of a
few dozen tokens wraps the KV ring several times). The LM head is drawn with std 0.5, so the
logits have a std of about 4: next-token distributions are peaked but far from one-hot, and
sampling at temperature 1 is meaningfully varied.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

import mistral_common
import tiny_models as tm

DATA_DIR = Path(mistral_common.__file__).parent / "data"
V1_TOKENIZER = DATA_DIR / "tokenizer.model.v1"
V3_TOKENIZER = DATA_DIR / "mistral_instruct_tokenizer_240323.model.v3"
TEKKEN_TOKENIZER = DATA_DIR / "tekken_240718.json"

BOS_ID = 1
EOS_ID = 2

SLIDING_WINDOW = 16
LM_HEAD_STD = 0.5

# The prompt (ids, BOS first) whose greedy continuation the ``eos`` variant cuts with EOS.
# "The weather today is sunny and warm." with the v1 tokenizer.
EOS_PROMPT_IDS = [1, 415, 8086, 3154, 349, 4376, 1780, 304, 6100, 28723]
EOS_MIN_STEP = 4  # EOS is emitted at a step >= this one (0-based)


def chat_config(vocab_size: int, **overrides):
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=SLIDING_WINDOW,
        max_position_embeddings=1024,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    kw.update(overrides)
    return tm.mistral_config(**kw)


def build_chat_model(config, seed: int):
    """tiny_models.build_model, then a wider LM head (std LM_HEAD_STD)."""
    model = tm.build_model(config, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        w = model.lm_head.weight
        w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float32) * LM_HEAD_STD)
    return model


@dataclass
class ChatModel(tm.TinyModel):
    tokenizer_file: Path | None = None  # the tokenizer file inside ``path`` (None: none)
    eos_step: int | None = None  # ``eos`` variant: step at which greedy decoding emits EOS
    greedy_before_eos: list | None = None  # ``eos`` variant: greedy tokens before EOS


def _save(model, path: Path, tokenizer_src: Path | None, tokenizer_name: str | None):
    tm.save_hf(model, path)
    tok = None
    if tokenizer_src is not None:
        tok = path / tokenizer_name
        shutil.copyfile(tokenizer_src, tok)
    return tok


def hf_greedy(model, prompt_ids, n: int):
    """Greedy continuation with transformers (full forward per step) and, per step, the gap
    between the best and the second-best logit."""
    ids = list(prompt_ids)
    out, gaps = [], []
    for _ in range(n):
        row = tm.reference_logits(model, ids)[-1]
        top2 = torch.topk(row, 2).values
        t = int(row.argmax())
        out.append(t)
        gaps.append(float(top2[0] - top2[1]))
        ids.append(t)
    return out, gaps


_CACHE: dict = {}


def _base_dir(tmp_path_factory) -> Path:
    if "base" not in _CACHE:
        _CACHE["base"] = tmp_path_factory.mktemp("chat_models")
    return _CACHE["base"]


def get_chat_model(kind: str, tmp_path_factory) -> ChatModel:
    """The ``kind`` ("v1", "v3", "tekken", "notok", "eos") model, built on first use."""
    if kind in _CACHE:
        return _CACHE[kind]
    base = _base_dir(tmp_path_factory)
    path = base / kind
    if kind == "v1":
        model = build_chat_model(chat_config(32000), tm.seed_of("chat-v1"))
        tok = _save(model, path, V1_TOKENIZER, "tokenizer.model")
        result = ChatModel(path, model, tokenizer_file=tok)
    elif kind == "v3":
        model = build_chat_model(chat_config(32768), tm.seed_of("chat-v3"))
        tok = _save(model, path, V3_TOKENIZER, "tokenizer.model.v3")
        result = ChatModel(path, model, tokenizer_file=tok)
    elif kind == "tekken":
        model = build_chat_model(chat_config(131072), tm.seed_of("chat-tekken"))
        tok = _save(model, path, TEKKEN_TOKENIZER, "tekken.json")
        result = ChatModel(path, model, tokenizer_file=tok)
    elif kind == "notok":
        v1 = get_chat_model("v1", tmp_path_factory)
        _save(v1.model, path, None, None)
        result = ChatModel(path, v1.model, tokenizer_file=None)
    elif kind == "eos":
        result = _make_eos_model(get_chat_model("v1", tmp_path_factory), path)
    else:
        raise KeyError(kind)
    _CACHE[kind] = result
    return result


def _make_eos_model(v1: ChatModel, path: Path) -> ChatModel:
    n = 24
    greedy, gaps = hf_greedy(v1.model, EOS_PROMPT_IDS, n)
    assert EOS_ID not in greedy, "the base model already emits EOS greedily; pick another prompt"
    # The first step >= EOS_MIN_STEP whose token is new (not seen earlier in the output) and
    # where every step up to it has a clear argmax.
    step = None
    for j in range(EOS_MIN_STEP, n):
        if greedy[j] not in greedy[:j] and min(gaps[: j + 1]) > 1e-3:
            step = j
            break
    assert step is not None, f"no usable step in greedy output {greedy} (gaps {gaps})"
    tok = greedy[step]
    model = copy.deepcopy(v1.model)
    with torch.no_grad():
        w = model.lm_head.weight
        row_eos, row_tok = w[EOS_ID].clone(), w[tok].clone()
        w[EOS_ID].copy_(row_tok)
        w[tok].copy_(row_eos)
    check, _ = hf_greedy(model, EOS_PROMPT_IDS, step + 1)
    assert check == greedy[:step] + [EOS_ID], (check, greedy)
    tok_file = _save(model, path, V1_TOKENIZER, "tokenizer.model")
    return ChatModel(
        path,
        model,
        tokenizer_file=tok_file,
        eos_step=step,
        greedy_before_eos=greedy[:step],
    )


def load_engine(model_or_path, **kwargs):
    """mc.Engine on the CPU, with a KV pool large enough for a handful of sequences."""
    import mistral_cuda as mc

    path = model_or_path.path if isinstance(model_or_path, tm.TinyModel) else model_or_path
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("num_blocks", 256)
    kwargs.setdefault("progress", False)
    return mc.Engine.from_pretrained(str(path), **kwargs)
