"""Helpers shared by the test modules: tiny random Mistral/Mixtral models built with
transformers, checkpoint writers (HF, sharded HF, bf16, Mistral "consolidated"),
a transformers reference for logits, raw safetensors read/write for corrupt files,
and the logits comparison used everywhere.

Kept in a plain module (conftest.py puts this directory on sys.path) so the tests can
``from tiny_models import ...`` whatever pytest import mode is configured.
"""

from __future__ import annotations

import copy
import json
import random
import re
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

# Tolerances of the oracle: both sides compute in float32.
REL_TOL = 1e-5  # ||a - b|| / ||b||
MAX_ABS_TOL = 1e-5  # max |a - b| / max |b|


# --------------------------------------------------------------------------------------
# Model building
# --------------------------------------------------------------------------------------


def seed_of(name: str) -> int:
    """A stable per-test / per-model seed derived from a name."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def mistral_config(**overrides) -> MistralConfig:
    """A tiny dense Mistral config: hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 256,
    sliding window 8. Any HF config field can be overridden."""
    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=512,
        sliding_window=8,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=0.15,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    kw.update(overrides)
    return MistralConfig(**kw)


def mixtral_config(**overrides) -> MixtralConfig:
    """A tiny Mixtral config (4 experts, top-2) with the same shapes as mistral_config."""
    kw = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=512,
        sliding_window=8,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        initializer_range=0.15,
        tie_word_embeddings=False,
        num_local_experts=4,
        num_experts_per_tok=2,
        router_jitter_noise=0.0,
        attn_implementation="eager",
        experts_implementation="eager",  # the plain per-expert loop as the oracle
    )
    kw.update(overrides)
    return MixtralConfig(**kw)


def build_model(config, seed: int):
    """Random float32 model in eval mode. Norm weights are drawn too (HF initialises them
    to 1), so a wrongly applied/ignored norm weight shows up in the logits."""
    torch.manual_seed(seed)
    cls = MixtralForCausalLM if config.model_type == "mixtral" else MistralForCausalLM
    model = cls(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@dataclass
class TinyModel:
    """A checkpoint on disk plus the float32 transformers model holding exactly its weights."""

    path: Path
    model: torch.nn.Module

    @property
    def config(self):
        return self.model.config

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def reference_logits(self, ids) -> torch.Tensor:
        return reference_logits(self.model, ids)

    def random_ids(self, n: int, seed: int) -> list[int]:
        return random_ids(n, self.vocab_size, seed)


def reference_logits(model, ids) -> torch.Tensor:
    """transformers' logits for one sequence, float32, shape [len(ids), vocab]."""
    with torch.no_grad():
        out = model(torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
    return out.logits[0].to(torch.float32)


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def save_hf(model, path: Path, *, dtype=None, max_shard_size=None) -> Path:
    """save_pretrained(safe_serialization=True). With ``dtype`` the model is cast first
    (and stays cast: callers pass a copy or cast back); ``max_shard_size`` shards."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    kw = {}
    if max_shard_size is not None:
        kw["max_shard_size"] = max_shard_size
    model.save_pretrained(str(path), safe_serialization=True, **kw)
    return path


def make_hf_checkpoint(path: Path, config, seed: int, *, max_shard_size=None) -> TinyModel:
    """Build a random float32 model and save it in HF layout."""
    model = build_model(config, seed)
    save_hf(model, path, max_shard_size=max_shard_size)
    return TinyModel(Path(path), model)


def make_bf16_checkpoint(path: Path, config, seed: int, dtype=torch.bfloat16) -> TinyModel:
    """Save a random model in bfloat16 (or float16); the reference is the float32 model
    holding the same rounded weights (bf16/f16 -> fp32 is exact).

    Only the parameters are rounded: casting the whole model to bf16 and back would also
    round the rotary inv_freq buffer and corrupt the reference."""
    model = build_model(config, seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))
    save_hf(copy.deepcopy(model), path, dtype=dtype)
    return TinyModel(Path(path), model)


# --------------------------------------------------------------------------------------
# HF <-> consolidated (Mistral) layout
# --------------------------------------------------------------------------------------


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """consolidated -> HF q/k row permutation, exactly as in transformers'
    convert_mistral_weights_to_hf.py (interleaved pairs -> rotate-half halves)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> consolidated: the inverse of hf_permute, written with explicit row indices.

    Within a head of size hd, HF row ``half * hd/2 + i`` holds the consolidated row
    ``2 * i + half`` (pair i, element ``half`` of the pair)."""
    dim1, _ = w.shape
    head_dim = dim1 // n_heads
    half_hd = head_dim // 2
    src = torch.empty(dim1, dtype=torch.long)
    for h in range(n_heads):
        for i in range(half_hd):
            for half in range(2):
                src[h * head_dim + 2 * i + half] = h * head_dim + half * half_hd + i
    return w[src].contiguous()


def read_checkpoint_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (single file or sharded), with the names
    and dtypes they have on disk."""
    hf_dir = Path(hf_dir)
    files = sorted(hf_dir.glob("*.safetensors"))
    assert files, f"no safetensors in {hf_dir}"
    tensors = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
    return tensors


_LAYER_MAP = {
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "block_sparse_moe.gate.weight": "feed_forward.gate.weight",
}


def hf_name_to_consolidated(name: str) -> str:
    top = {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    }
    if name in top:
        return top[name]
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        raise KeyError(f"unexpected HF tensor name {name}")
    layer, rest = parts[2], ".".join(parts[3:])
    if rest in _LAYER_MAP:
        return f"layers.{layer}.{_LAYER_MAP[rest]}"
    # block_sparse_moe.experts.E.wK.weight -> feed_forward.experts.E.wK.weight
    if rest.startswith("block_sparse_moe.experts.") and parts[-2] in ("w1", "w2", "w3"):
        return f"layers.{layer}." + rest.replace("block_sparse_moe.", "feed_forward.", 1)
    raise KeyError(f"unexpected HF tensor name {name}")


def consolidated_params(config) -> dict:
    """params.json for an HF Mistral/Mixtral config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = {
        "dim": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "head_dim": head_dim,
        "hidden_dim": config.intermediate_size,
        "n_heads": config.num_attention_heads,
        "n_kv_heads": config.num_key_value_heads,
        "norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "rope_theta": config.rope_parameters["rope_theta"],
        "sliding_window": config.sliding_window,
        "max_seq_len": config.max_position_embeddings,
    }
    if config.model_type == "mixtral":
        params["moe"] = {
            "num_experts": config.num_local_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
        }
    return params


def write_consolidated(hf_dir: Path, out_dir: Path, config) -> Path:
    """Convert an HF checkpoint on disk into Mistral's consolidated layout
    (params.json + consolidated.safetensors), un-permuting wq/wk rows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = consolidated_params(config)
    out = {}
    for name, t in read_checkpoint_tensors(hf_dir).items():
        new = hf_name_to_consolidated(name)
        if new.endswith("attention.wq.weight"):
            t = hf_unpermute(t, params["n_heads"])
        elif new.endswith("attention.wk.weight"):
            t = hf_unpermute(t, params["n_kv_heads"])
        out[new] = t.contiguous()
    save_file(out, str(out_dir / "consolidated.safetensors"))
    (out_dir / "params.json").write_text(json.dumps(params, indent=2))
    return out_dir


# --------------------------------------------------------------------------------------
# Raw safetensors (for hand-made corrupt files)
# --------------------------------------------------------------------------------------


def read_raw_safetensors(path: Path) -> tuple[dict, bytes]:
    """(header dict, data bytes) of a well-formed safetensors file."""
    blob = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    return header, blob[8 + n :]


def encode_header(header: dict) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes


def write_raw_safetensors(
    path: Path,
    header: dict | bytes,
    data: bytes,
    *,
    header_len: int | None = None,
    truncate_to: int | None = None,
) -> Path:
    """Write ``<u64 LE header length><header><data>``. ``header`` may be raw bytes (to
    write invalid JSON); ``header_len`` overrides the length field; ``truncate_to`` cuts
    the finished file to that many bytes."""
    hb = header if isinstance(header, bytes) else encode_header(header)
    n = len(hb) if header_len is None else header_len
    blob = struct.pack("<Q", n) + hb + data
    if truncate_to is not None:
        blob = blob[:truncate_to]
    Path(path).write_bytes(blob)
    return Path(path)


def tensor_entries(header: dict) -> list[tuple[str, dict]]:
    """Header entries other than __metadata__, sorted by data offset."""
    items = [(k, v) for k, v in header.items() if k != "__metadata__"]
    return sorted(items, key=lambda kv: kv[1]["data_offsets"][0])


# --------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------


def logits_error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius error, max abs error / max |expected|)."""
    a = actual.detach().to(torch.float64)
    b = expected.detach().to(torch.float64)
    rel = float((a - b).norm() / b.norm())
    mx = float((a - b).abs().max() / b.abs().max())
    return rel, mx


def assert_logits_close(actual, expected, what: str = "") -> None:
    """Engine logits vs reference: same shape, float32, finite, relative error <= 1e-5
    and max abs error <= 1e-5 * max |reference|."""
    assert isinstance(actual, torch.Tensor), f"{what}: expected a torch.Tensor, got {type(actual)}"
    assert actual.dtype == torch.float32, f"{what}: dtype {actual.dtype}, expected float32"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    )
    assert not torch.isnan(actual).any(), f"{what}: NaN in logits"
    assert torch.isfinite(actual).all(), f"{what}: inf in logits"
    rel, mx = logits_error(actual, expected)
    detail = ""
    if actual.dim() == 2 and (rel > REL_TOL or mx > MAX_ABS_TOL):
        a = actual.double()
        b = expected.double()
        row_err = ((a - b).norm(dim=-1) / b.norm(dim=-1)).tolist()
        bad = [i for i, e in enumerate(row_err) if e > REL_TOL]
        detail = f"; rows with rel err > {REL_TOL}: {bad[:20]}{'...' if len(bad) > 20 else ''}"
    assert rel <= REL_TOL and mx <= MAX_ABS_TOL, (
        f"{what}: relative error {rel:.3g} (tol {REL_TOL}), max abs error / max|ref| {mx:.3g} "
        f"(tol {MAX_ABS_TOL}){detail}"
    )


def ring_bound(window: int, block_size: int) -> int:
    """Most KV blocks a sliding-window sequence may hold."""
    return math.ceil(window / block_size) + 1


# --------------------------------------------------------------------------------------
# Hand-made corrupt safetensors files
# --------------------------------------------------------------------------------------
# Each corruption takes a well-formed safetensors file and writes a broken copy to ``dst``.
# It returns the regex (case-insensitive, loose) that the engine's error message must
# match: the key noun of the problem.

_TRUNC = r"truncat|offset|size|bound|range|end|short|length|exceed|eof|incomplete"


def _target(header: dict) -> str:
    """A tensor in the middle of the data (not the first, not the last)."""
    entries = tensor_entries(header)
    return entries[len(entries) // 2][0]


def corrupt_truncated_in_data(src: Path, dst: Path) -> str:
    header, data = read_raw_safetensors(src)
    hb = encode_header(header)
    write_raw_safetensors(dst, hb, data, truncate_to=8 + len(hb) + len(data) // 2)
    return _TRUNC


def corrupt_truncated_in_header(src: Path, dst: Path) -> str:
    header, data = read_raw_safetensors(src)
    hb = encode_header(header)
    write_raw_safetensors(dst, hb, data, truncate_to=8 + len(hb) // 2)
    return r"header"


def corrupt_shorter_than_length_field(src: Path, dst: Path) -> str:
    Path(dst).write_bytes(Path(src).read_bytes()[:5])
    return r"header|truncat|short|size|length"


def corrupt_header_length_past_eof(src: Path, dst: Path) -> str:
    header, data = read_raw_safetensors(src)
    hb = encode_header(header)
    write_raw_safetensors(dst, hb, data, header_len=8 + len(hb) + len(data) + 1000)
    return r"header"


def corrupt_header_length_huge(src: Path, dst: Path) -> str:
    header, data = read_raw_safetensors(src)
    write_raw_safetensors(dst, header, data, header_len=2**63 + 12345)
    return r"header"


def corrupt_invalid_json(src: Path, dst: Path) -> str:
    header, data = read_raw_safetensors(src)
    hb = encode_header(header)
    broken = hb[: len(hb) // 2] + b"}}garbage{{"
    broken += b" " * (-len(broken) % 8)
    write_raw_safetensors(dst, broken, data)
    return r"header|json"


def corrupt_header_not_an_object(src: Path, dst: Path) -> str:
    _, data = read_raw_safetensors(src)
    write_raw_safetensors(dst, b"[1, 2, 3]       ", data)
    return r"header|json|object"


def corrupt_offsets_past_end(src: Path, dst: Path) -> str:
    header, data = read_raw_safetensors(src)
    name = tensor_entries(header)[-1][0]
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [b + 4096, e + 4096]
    write_raw_safetensors(dst, header, data)
    return rf"{re.escape(name)}|offset"


def corrupt_offsets_reversed(src: Path, dst: Path) -> str:
    header, data = read_raw_safetensors(src)
    name = _target(header)
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [e, b]
    write_raw_safetensors(dst, header, data)
    return rf"{re.escape(name)}|offset"


def corrupt_overlapping_offsets(src: Path, dst: Path) -> str:
    header, data = read_raw_safetensors(src)
    name = _target(header)
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [b - 16, e - 16]  # same size, reaches into its neighbour
    write_raw_safetensors(dst, header, data)
    return r"overlap|offset"


def corrupt_size_not_matching_shape(src: Path, dst: Path) -> str:
    header, data = read_raw_safetensors(src)
    name = _target(header)
    shape = header[name]["shape"]
    header[name]["shape"] = shape[:-1] + [shape[-1] - 1]
    write_raw_safetensors(dst, header, data)
    return rf"{re.escape(name)}|size|shape|offset|bytes"


def corrupt_size_not_matching_dtype(src: Path, dst: Path) -> str:
    header, data = read_raw_safetensors(src)
    name = _target(header)
    assert header[name]["dtype"] == "F32"
    header[name]["dtype"] = "F16"
    write_raw_safetensors(dst, header, data)
    return rf"{re.escape(name)}|size|shape|offset|bytes|dtype"


def _unknown_dtype(dtype: str):
    def corrupt(src: Path, dst: Path) -> str:
        header, data = read_raw_safetensors(src)
        header[_target(header)]["dtype"] = dtype
        write_raw_safetensors(dst, header, data)
        return r"dtype"

    corrupt.__name__ = f"corrupt_unknown_dtype_{dtype}"
    return corrupt


def corrupt_missing_data_offsets(src: Path, dst: Path) -> str:
    header, data = read_raw_safetensors(src)
    del header[_target(header)]["data_offsets"]
    write_raw_safetensors(dst, header, data)
    return r"header|offset"


CORRUPTIONS = {
    "truncated-in-data": corrupt_truncated_in_data,
    "truncated-in-header": corrupt_truncated_in_header,
    "shorter-than-length-field": corrupt_shorter_than_length_field,
    "header-length-past-eof": corrupt_header_length_past_eof,
    "header-length-huge": corrupt_header_length_huge,
    "invalid-json": corrupt_invalid_json,
    "header-not-an-object": corrupt_header_not_an_object,
    "offsets-past-end": corrupt_offsets_past_end,
    "offsets-reversed": corrupt_offsets_reversed,
    "overlapping-offsets": corrupt_overlapping_offsets,
    "size-not-matching-shape": corrupt_size_not_matching_shape,
    "size-not-matching-dtype": corrupt_size_not_matching_dtype,
    "unknown-dtype-F8_E9M9": _unknown_dtype("F8_E9M9"),
    "unknown-dtype-I4": _unknown_dtype("I4"),
    "missing-data-offsets": corrupt_missing_data_offsets,
}


def run_interleaved(m, prompts, vocab, *, seed, all_logits=True, start_steps=None):
    """Drive several sequences through m.step together: each step carries one entry per
    unfinished sequence (in shuffled order) -- a prefill chunk of random size for a fresh
    sequence, then mostly single decode tokens with occasional multi-token chunks.
    Returns, per prompt, the logits rows collected (all rows, or last-row-per-step with
    the positions they belong to)."""
    rng = random.Random(seed)
    start_steps = start_steps or [0] * len(prompts)
    seqs = {}
    pos = [0] * len(prompts)
    rows = [[] for _ in prompts]
    positions = [[] for _ in prompts]
    step_no = 0
    while any(p < len(prompt) for p, prompt in zip(pos, prompts)):
        entries, owners = [], []
        for i, prompt in enumerate(prompts):
            if step_no < start_steps[i] or pos[i] >= len(prompt):
                continue
            if i not in seqs:
                seqs[i] = m.add_sequence()
                k = rng.choice([1, 4, 9, 23])
            else:
                k = rng.choice([1, 1, 1, 2, 5, 11])
            k = min(k, len(prompt) - pos[i])
            entries.append((seqs[i], prompt[pos[i] : pos[i] + k]))
            owners.append((i, k))
        order = list(range(len(entries)))
        rng.shuffle(order)
        entries = [entries[j] for j in order]
        owners = [owners[j] for j in order]
        outs = m.step(entries, all_logits=all_logits) if entries else []
        assert len(outs) == len(entries)
        for out, (i, k) in zip(outs, owners):
            if all_logits:
                assert tuple(out.shape) == (k, vocab)
                rows[i].append(out)
                positions[i].extend(range(pos[i], pos[i] + k))
            else:
                assert tuple(out.shape) == (vocab,)
                rows[i].append(out.unsqueeze(0))
                positions[i].append(pos[i] + k - 1)
            pos[i] += k
        step_no += 1
    for s in seqs.values():
        m.free_sequence(s)
    return [torch.cat(r) for r in rows], positions
