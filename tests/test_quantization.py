"""8-bit and 4-bit weights: the int8 / int4 quantize-on-load rules and kernels, and AWQ / GPTQ
checkpoints, against oracles written here from the formats' descriptions:

- the quantization rules and the engine's int4 nibble layout, unpacked by plain torch;
- the CPU linear and MoE ops on quantized weights vs plain torch on the dequantized matrices;
- whole models: the engine on a quantized model vs transformers running the dequantized weights
  (float32 tolerance), and the quantized model's distance from the float one (bounds measured
  and stated below);
- AWQ (GEMM) and GPTQ (with and without act-order) checkpoints packed by the packers in this file
  (nothing shared with the loader), for Mistral and Mixtral.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MistralForCausalLM, MixtralForCausalLM

import mistral_cuda as mc
import tiny_models as tm
from mistral_cuda import testing as ops
from tiny_models import assert_logits_close

# Every quantized matrix of a Hugging Face Mistral / Mixtral checkpoint.
QUANTIZED = re.compile(r"(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|block_sparse_moe\.experts\.\d+\.w[123])\.weight$")

# Measured distance of quantized from float logits on the tiny random models below (relative
# Frobenius error over 29 positions, 4 seeds x Mistral/Mixtral, weights ~ N(0, 0.05)): int8
# 0.014-0.019, int4 (groups of 128) 0.23-0.36 (random weights fill each group's range, about
# 10% error per matrix, over eight matrices per token path); the bounds leave about 2x room.
FLOAT_DISTANCE_BOUND = {"int8": 0.04, "int4": 0.6}


def tiny_config(kind: str, **overrides):
    """Widths that int4 groups of 128 divide: dim 128, FFN 256, head_dim 32."""
    kw = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
              initializer_range=0.05)
    kw.update(overrides)
    return tm.mistral_config(**kw) if kind == "mistral" else tm.mixtral_config(**kw)


# --------------------------------------------------------------------------------------
# The formats, from their descriptions (independent of csrc/)
# --------------------------------------------------------------------------------------


def ref_int8(w: torch.Tensor):
    """Per output row, symmetric: s = max|w| / 127, q = clamp(round(w / s), -127, 127)."""
    w = w.float()
    amax = w.abs().amax(dim=-1)
    s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / s[..., None]), -127, 127)
    return q, s


def ref_int4(w: torch.Tensor, group: int):
    """Per group of `group` inputs, the range widened to include 0: s = (hi - lo) / 15,
    z = clamp(round(-lo / s), 0, 15), q = clamp(round(w / s) + z, 0, 15)."""
    w = w.float()
    g = w.reshape(*w.shape[:-1], w.shape[-1] // group, group)
    lo = torch.clamp(g.amin(dim=-1), max=0.0)
    hi = torch.clamp(g.amax(dim=-1), min=0.0)
    s = (hi - lo) / 15.0
    s = torch.where(s == 0, torch.ones_like(s), s)
    z = torch.clamp(torch.round(-lo / s), 0, 15)
    q = torch.clamp(torch.round(g / s[..., None]) + z[..., None], 0, 15)
    return q.reshape(w.shape), s, z


def dequant_int4(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group: int) -> torch.Tensor:
    g = q.reshape(*q.shape[:-1], q.shape[-1] // group, group)
    return ((g - z[..., None]) * s[..., None]).reshape(q.shape)


def unpack_engine_int4(data: torch.Tensor) -> torch.Tensor:
    """The engine's int4 layout: per 32 columns 16 bytes, byte i = q[i] | q[i + 16] << 4."""
    b = data.to(torch.int32).reshape(*data.shape[:-1], data.shape[-1] // 16, 16)
    return torch.cat([b & 0xF, b >> 4], dim=-1).reshape(*data.shape[:-1], data.shape[-1] * 2).float()


def ref_dequantized(w: torch.Tensor, fmt: str, group: int = 128) -> torch.Tensor:
    if fmt == "int8":
        q, s = ref_int8(w)
        return q * s[..., None]
    q, s, z = ref_int4(w, group)
    return dequant_int4(q, s, z, group)


def as_int32(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (int64) as the int32 bit patterns checkpoints store."""
    values = values.to(torch.int64)
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM packing of a [rows, cols] int tensor along cols: nibble i of word j holds column
    8j + AWQ_ORDER[i]."""
    rows, cols = q.shape
    q = q.to(torch.int64).reshape(rows, cols // 8, 8)
    words = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for i, column in enumerate(AWQ_ORDER):
        words |= q[:, :, column] << (4 * i)
    return as_int32(words)


def pack_gptq_rows(q: torch.Tensor) -> torch.Tensor:
    """GPTQ qweight packing of [K, N] along K (the input): nibble i of word (k, n) is row 8k + i."""
    K, N = q.shape
    q = q.to(torch.int64).reshape(K // 8, 8, N)
    words = torch.zeros(K // 8, N, dtype=torch.int64)
    for i in range(8):
        words |= q[:, i, :] << (4 * i)
    return as_int32(words)


def pack_gptq_cols(q: torch.Tensor) -> torch.Tensor:
    """GPTQ qzeros packing of [G, N] along N in plain order: nibble i of word j is column 8j + i."""
    rows, cols = q.shape
    q = q.to(torch.int64).reshape(rows, cols // 8, 8)
    words = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for i in range(8):
        words |= q[:, :, i] << (4 * i)
    return as_int32(words)


def random_int4_codes(w: torch.Tensor, group_of_input: torch.Tensor, groups: int, gen: torch.Generator):
    """q, z in 1..15 and f16-exact s for a float [N, K] weight with each input column's group:
    s, z fitted to the group's range (so the dequantized model stays close to w)."""
    N, K = w.shape
    s = torch.empty(N, groups)
    z = torch.empty(N, groups)
    for g in range(groups):
        cols = w[:, group_of_input == g]
        lo, hi = cols.amin(dim=1).clamp(max=0), cols.amax(dim=1).clamp(min=0)
        s[:, g] = ((hi - lo) / 14.0).clamp(min=1e-3).half().float()
        z[:, g] = torch.clamp(torch.round(-lo / s[:, g]) + 1, 1, 15)
    q = torch.clamp(torch.round(w / s[:, group_of_input]) + z[:, group_of_input], 0, 15)
    # A few codes at random so no structure of the fit is assumed.
    flip = torch.rand(N, K, generator=gen) < 0.05
    q = torch.where(flip, torch.randint(0, 16, (N, K), generator=gen).float(), q)
    deq = (q - z[:, group_of_input]) * s[:, group_of_input]
    return q, z, s, deq


def input_key(name: str) -> str:
    """Modules that read the same input (q/k/v; gate/up; an expert's w1/w3) share GPTQ's
    act-order permutation, as they share the Hessian it comes from."""
    return re.sub(r"self_attn\.[qkv]_proj|mlp\.(gate|up)_proj|(experts\.\d+\.)w[13]", r"in\2", name)


def write_packed_checkpoint(src: Path, out: Path, ref_out: Path, method: str, *, group: int = 128,
                            act_order: bool = False, seed: int = 0, quant_config_extra=None) -> None:
    """Packs the float checkpoint `src` as AWQ or GPTQ into `out` and writes the dequantized
    float checkpoint (what transformers runs as the reference) into `ref_out`."""
    tensors = load_file(str(src / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    perms = {}
    packed, dequantized = {}, {}
    for name, w in tensors.items():
        if not QUANTIZED.search(name):
            packed[name] = w
            dequantized[name] = w
            continue
        N, K = w.shape
        G = K if group == -1 else group
        groups = K // G
        base = name[: -len(".weight")]
        group_of_input = torch.arange(K) // G
        if act_order:
            key = input_key(base)
            if key not in perms:
                perms[key] = torch.randperm(K, generator=gen)
            # GPTQ: quantized in the permuted order, g_idx[perm[i]] = i // G.
            group_of_input = torch.empty(K, dtype=torch.int64)
            group_of_input[perms[key]] = torch.arange(K) // G
        q, z, s, deq = random_int4_codes(w.float(), group_of_input, groups, gen)
        dequantized[name] = deq
        if method == "awq":
            packed[base + ".qweight"] = pack_awq(q.t())  # [K, N / 8]
            packed[base + ".qzeros"] = pack_awq(z.t())  # [G, N / 8]
            packed[base + ".scales"] = s.t().contiguous().half()  # [G, N]
        else:
            packed[base + ".qweight"] = pack_gptq_rows(q.t().contiguous())  # [K / 8, N]
            packed[base + ".qzeros"] = pack_gptq_cols((z - 1).t().contiguous())  # [G, N / 8], z - 1 stored
            packed[base + ".scales"] = s.t().contiguous().half()
            packed[base + ".g_idx"] = group_of_input.to(torch.int32)
    config = json.loads((src / "config.json").read_text())
    for d, state in ((out, packed), (ref_out, dequantized)):
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"))
    (ref_out / "config.json").write_text(json.dumps(config))
    if method == "awq":
        qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": None}
    else:
        qc = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order, "sym": False,
              "damp_percent": 0.01, "true_sequential": True, "static_groups": False, "checkpoint_format": "gptq"}
    qc.update(quant_config_extra or {})
    config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config))


def dequantized_checkpoint(src: Path, out: Path, fmt: str) -> None:
    """`src` with every quantized matrix replaced by its dequantized form under `fmt`."""
    tensors = load_file(str(src / "model.safetensors"))
    deq = {k: (ref_dequantized(v, fmt) if QUANTIZED.search(k) else v) for k, v in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in deq.items()}, str(out / "model.safetensors"))
    shutil.copy(src / "config.json", out / "config.json")


def hf_reference(path: Path, kind: str):
    cls = MixtralForCausalLM if kind == "mixtral" else MistralForCausalLM
    kw = {"experts_implementation": "eager"} if kind == "mixtral" else {}
    return cls.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager", **kw).eval()


# --------------------------------------------------------------------------------------
# The quantization rules and the stored layout
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 256), (3, 24, 128)])
def test_int8_quantize_matches_the_rule(shape, dtype):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.3).to(dtype)
    qw = ops.quantize(w, "int8")
    q, s = ref_int8(w)
    assert qw.data.dtype == torch.int8 and tuple(qw.data.shape) == shape
    assert torch.equal(qw.scales, s)
    assert torch.equal(qw.data.float(), q)
    # The rule's own error bound: half a step per element.
    assert ((q * s[..., None] - w.float()).abs() <= s[..., None] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("shape", [(37, 256), (3, 24, 128)])
def test_int4_quantize_matches_the_rule_and_layout(shape, group):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.3
    w[..., :group] = 0.25  # a constant group: representable exactly (the range includes 0)
    qw = ops.quantize(w, "int4", group)
    q, s, z = ref_int4(w, group)
    assert qw.data.dtype == torch.uint8 and tuple(qw.data.shape) == shape[:-1] + (shape[-1] // 2,)
    assert torch.equal(qw.scales, s) and torch.equal(qw.zeros, z)
    assert torch.equal(unpack_engine_int4(qw.data), q)
    deq = dequant_int4(q, s, z, group)
    assert ((deq - w).abs() <= s.repeat_interleave(group, dim=-1) / 2 * (1 + 1e-5) + 1e-7).all()
    assert torch.allclose(deq[..., :group], torch.full_like(deq[..., :group], 0.25), rtol=1e-6, atol=0)


def test_quantize_refuses_widths_the_format_cannot_hold():
    with pytest.raises(ValueError):
        ops.quantize(torch.randn(8, 96), "int4", 64)  # 64 does not divide 96
    with pytest.raises(ValueError):
        ops.quantize(torch.randn(8, 64), "int3")


# --------------------------------------------------------------------------------------
# CPU ops on quantized weights vs plain torch on the dequantized matrices
# --------------------------------------------------------------------------------------


def dequantized_of(qw: ops.QuantizedWeight) -> torch.Tensor:
    """The float matrix a QuantizedWeight stands for, by the format description."""
    if qw.format == "int8":
        return qw.data.float() * qw.scales[..., None]
    stored = dequant_int4(unpack_engine_int4(qw.data), qw.scales, qw.zeros, qw.group_size)
    if qw.col_perm is None:
        return stored
    out = torch.empty_like(stored)
    out.scatter_(-1, qw.col_perm.long().unsqueeze(-2).expand_as(stored), stored)  # out[..., perm[k]] = stored[..., k]
    return out


def assert_f32_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert not torch.isnan(got).any(), what
    err = float((got.double() - want.double()).norm() / want.double().norm())
    assert err <= 2e-6, f"{what}: relative error {err:.3g}"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("T", [1, 2, 3, 17])
@pytest.mark.parametrize("N,K", [(37, 256), (64, 128), (5, 384)])
def test_quantized_linear_equals_dequantized_matmul(fmt, T, N, K):
    gen = torch.Generator().manual_seed(N * 1000 + K + T)
    qw = ops.quantize(torch.randn(N, K, generator=gen), fmt, 128)
    x = torch.randn(T, K, generator=gen)
    assert_f32_close(ops.quantized_linear(x, qw), x.double() @ dequantized_of(qw).double().T, f"{fmt} T={T}")


def test_int4_col_perm_reads_inputs_in_stored_order():
    gen = torch.Generator().manual_seed(5)
    N, K = 24, 256
    base = ops.quantize(torch.randn(N, K, generator=gen), "int4", 128)
    perm = torch.randperm(K, generator=gen).to(torch.int32)
    qw = ops.QuantizedWeight("int4", (N, K), base.data, base.scales, base.zeros, 128, perm)
    x = torch.randn(3, K, generator=gen)
    # Stored column k multiplies input column perm[k].
    stored = dequantized_of(base)
    want = x[:, perm.long()].double() @ stored.double().T
    assert_f32_close(ops.quantized_linear(x, qw), want, "col_perm")


def torch_moe(x, router, w13, w2, top_k):
    logits = x @ router.T
    top, experts = torch.topk(logits, top_k, dim=-1)
    weights = torch.softmax(top, dim=-1)
    F = w2.shape[-1]
    y = torch.zeros_like(x, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(top_k):
            e = int(experts[t, k])
            gu = w13[e].double() @ x[t].double()
            h = torch.nn.functional.silu(gu[:F]) * gu[F:]
            y[t] += weights[t, k].double() * (w2[e].double() @ h)
    return y


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_quantized_moe_equals_dequantized_experts(fmt, T):
    gen = torch.Generator().manual_seed(T)
    E, D, F = 8, 128, 256
    x = torch.randn(T, D, generator=gen)
    router = torch.randn(E, D, generator=gen)
    w13 = ops.quantize(torch.randn(E, 2 * F, D, generator=gen) * 0.1, fmt)
    w2 = ops.quantize(torch.randn(E, D, F, generator=gen) * 0.1, fmt)
    got = ops.quantized_moe_ffn(x, router, w13, w2, 2)
    want = torch_moe(x, router, dequantized_of(w13), dequantized_of(w2), 2)
    assert_f32_close(got, want, f"moe {fmt} T={T}")


def ref_quantized_activations(x: torch.Tensor, qw: ops.QuantizedWeight) -> torch.Tensor:
    """The fast mode from its description: x quantized per row (sx = max|x| / 127, qx =
    round(x / sx)), integer products with the stored q, then the scales (float64 here)."""
    amax = x.abs().amax(dim=1)
    sx = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    qx = torch.clamp(torch.round(x / sx[:, None]), -127, 127).double()
    if qw.format == "int8":
        return (qx @ qw.data.double().T) * qw.scales.double() * sx.double()[:, None]
    q = unpack_engine_int4(qw.data).double()
    G = qw.group_size
    N, K = q.shape
    per_group = torch.einsum("ngk,tgk->tng", q.reshape(N, K // G, G), qx.reshape(-1, K // G, G))
    zero_term = qw.zeros.double()[None] * qx.reshape(-1, 1, K // G, G).sum(-1)
    return ((per_group - zero_term) * qw.scales.double()[None]).sum(-1) * sx.double()[:, None]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("N,K,G", [(37, 256, 128), (64, 512, 256)])
def test_quantized_activations_mode_matches_its_description(fmt, T, N, K, G):
    gen = torch.Generator().manual_seed(T * 7 + K)
    qw = ops.quantize(torch.randn(N, K, generator=gen), fmt, G).with_quantized_activations()
    x = torch.randn(T, K, generator=gen)
    got = ops.quantized_linear(x, qw)
    assert_f32_close(got, ref_quantized_activations(x, qw), f"fast {fmt} T={T}")
    # ...and it is near the exact mode (activation rounding: about 0.5% here).
    exact = x.double() @ dequantized_of(qw).double().T
    assert float((got.double() - exact).norm() / exact.norm()) < 0.02


def test_quantized_activations_mode_falls_back_where_widths_do_not_fit():
    gen = torch.Generator().manual_seed(4)
    qw = ops.quantize(torch.randn(16, 96, generator=gen), "int4", 32).with_quantized_activations()
    x = torch.randn(2, 96, generator=gen)
    assert_f32_close(ops.quantized_linear(x, qw), x.double() @ dequantized_of(qw).double().T, "fallback")


# --------------------------------------------------------------------------------------
# Whole models: quantize-on-load
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_quantized_model_matches_transformers_on_dequantized_weights(kind, fmt, tmp_path):
    tiny = tm.make_hf_checkpoint(tmp_path / "float", tiny_config(kind), tm.seed_of(f"q-{kind}-{fmt}"))
    dequantized_checkpoint(tiny.path, tmp_path / "deq", fmt)
    reference = hf_reference(tmp_path / "deq", kind)
    engine = mc.Engine.from_pretrained(tiny.path, quantization=fmt, progress=False)
    assert engine.quantization == fmt
    ids = tiny.random_ids(29, tm.seed_of(f"q-ids-{kind}"))
    want = tm.reference_logits(reference, ids)
    for chunk in (1, 29):
        assert_logits_close(engine.logits(ids, chunk_size=chunk), want, f"{kind} {fmt} chunk {chunk}")
    # Quantization error itself, against the float model (bounds measured, see the top).
    rel, _ = tm.logits_error(engine.logits(ids), tiny.reference_logits(ids))
    assert rel <= FLOAT_DISTANCE_BOUND[fmt], f"{kind} {fmt}: {rel:.3g} from the float model"


def test_quantize_on_load_of_a_bf16_checkpoint_keeps_float_parts_in_dtype(tmp_path):
    tiny = tm.make_bf16_checkpoint(tmp_path / "bf16", tiny_config("mistral"), tm.seed_of("q-bf16"))
    engine = mc.Engine.from_pretrained(tiny.path, quantization="int4", progress=False)
    assert engine.quantization == "int4" and engine.model.dtype == "bfloat16"
    dequantized_checkpoint(tiny.path, tmp_path / "deq", "int4")
    ids = tiny.random_ids(11, 3)
    assert_logits_close(engine.logits(ids), tm.reference_logits(hf_reference(tmp_path / "deq", "mistral"), ids), "bf16")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_quantized_activations_model_stays_near_the_exact_one(kind, fmt, tmp_path):
    tiny = tm.make_hf_checkpoint(tmp_path, tiny_config(kind), tm.seed_of(f"qa-{kind}-{fmt}"))
    exact = mc.Engine.from_pretrained(tiny.path, quantization=fmt, progress=False)
    fast = mc.Engine.from_pretrained(tiny.path, quantization=fmt, quantize_activations=True, progress=False)
    ids = tiny.random_ids(19, 5)
    rel, _ = tm.logits_error(fast.logits(ids), exact.logits(ids))
    # Measured 0.016-0.058 on these models (3 seeds each; the largest a Mixtral routing flip).
    assert 0 < rel <= 0.15, f"{kind} {fmt}: fast mode {rel:.3g} from the exact one"


def test_quantized_activations_needs_quantized_weights(tmp_path):
    tiny = tm.make_hf_checkpoint(tmp_path, tiny_config("mistral"), 12)
    with pytest.raises(mc.InvalidRequestError, match="quantize_activations"):
        mc.Engine.from_pretrained(tiny.path, quantize_activations=True, progress=False)


def test_float_checkpoint_reports_no_quantization(tmp_path):
    tiny = tm.make_hf_checkpoint(tmp_path, tiny_config("mistral"), 7)
    assert mc.Engine.from_pretrained(tiny.path, progress=False).quantization is None


def test_unknown_quantization_is_refused(tmp_path):
    tiny = tm.make_hf_checkpoint(tmp_path, tiny_config("mistral"), 8)
    with pytest.raises(mc.InvalidRequestError, match="int3"):
        mc.Engine.from_pretrained(tiny.path, quantization="int3", progress=False)


def test_int4_needs_widths_the_groups_divide(tmp_path):
    tiny = tm.make_hf_checkpoint(tmp_path, tm.mistral_config(), 9)  # dim 64: groups of 128 do not fit
    with pytest.raises(mc.UnsupportedError, match="group size 128"):
        mc.Engine.from_pretrained(tiny.path, quantization="int4", progress=False)
    assert mc.Engine.from_pretrained(tiny.path, quantization="int8", progress=False).quantization == "int8"


def test_from_config_quantized():
    small = mc.ModelConfig()
    for field, value in dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256,
                             vocab_size=300, max_seq_len=64).items():
        setattr(small, field, value)
    f = mc.Engine.from_config(small, seed=3)
    q = mc.Engine.from_config(small, seed=3, quantization="int8")
    assert q.quantization == "int8" and f.quantization is None
    ids = [1, 5, 9, 200]
    rel, _ = tm.logits_error(q.logits(ids), f.logits(ids))
    assert 0 < rel <= FLOAT_DISTANCE_BOUND["int8"]


# --------------------------------------------------------------------------------------
# AWQ and GPTQ checkpoints
# --------------------------------------------------------------------------------------


PACKED_CASES = [
    ("mistral", "awq", False, 128),
    ("mixtral", "awq", False, 128),
    ("mistral", "awq", False, 64),
    ("mistral", "gptq", False, 128),
    ("mistral", "gptq", True, 128),
    ("mixtral", "gptq", False, 128),
    ("mixtral", "gptq", True, 64),
    ("mistral", "gptq", False, -1),
]


@pytest.mark.parametrize("kind,method,act_order,group", PACKED_CASES)
def test_packed_checkpoint_matches_transformers_on_dequantized_weights(kind, method, act_order, group, tmp_path):
    name = f"{kind}-{method}-{act_order}-{group}"
    tiny = tm.make_hf_checkpoint(tmp_path / "float", tiny_config(kind), tm.seed_of(name))
    write_packed_checkpoint(tiny.path, tmp_path / "packed", tmp_path / "deq", method, group=group,
                            act_order=act_order, seed=tm.seed_of(name + "-codes"))
    engine = mc.Engine.from_pretrained(tmp_path / "packed", progress=False)
    assert engine.quantization == method
    ids = tiny.random_ids(23, tm.seed_of(name + "-ids"))
    want = tm.reference_logits(hf_reference(tmp_path / "deq", kind), ids)
    for chunk in (1, 23):
        assert_logits_close(engine.logits(ids, chunk_size=chunk), want, f"{name} chunk {chunk}")


@pytest.fixture(scope="module")
def packed_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed-src")
    return tm.make_hf_checkpoint(root / "float", tiny_config("mistral"), 11)


def edited_packed(src, root: Path, method: str, edit=None, **kw) -> Path:
    out = root / "packed"
    write_packed_checkpoint(src.path, out, root / "deq", method, **kw)
    if edit is not None:
        tensors = load_file(str(out / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"quant_method": "bitsandbytes"}, "bitsandbytes"),
        ({"quant_method": "exl2"}, "exl2"),
        ({"bits": 8}, "8 bits"),
        ({"bits": 3}, "3 bits"),
        ({"version": "gemv"}, "gemv"),
        ({"zero_point": False}, "zero_point"),
    ],
)
def test_unsupported_quantization_config_is_refused_by_name(packed_source, tmp_path, extra, match):
    out = edited_packed(packed_source, tmp_path, "awq", quant_config_extra=extra)
    with pytest.raises(mc.CheckpointError, match=match):
        mc.Engine.from_pretrained(out, progress=False)


def test_gptq_unsupported_format_is_refused(packed_source, tmp_path):
    out = edited_packed(packed_source, tmp_path, "gptq", quant_config_extra={"checkpoint_format": "marlin"})
    with pytest.raises(mc.CheckpointError, match="marlin"):
        mc.Engine.from_pretrained(out, progress=False)


def test_extra_quantization_keys_are_accepted(packed_source, tmp_path):
    extra = {"damp_percent": 0.1, "true_sequential": False, "model_name_or_path": None, "model_file_base_name": "m",
             "quant_type": "int", "pack_dtype": "int32", "meta": {"quantizer": ["x"]}}
    out = edited_packed(packed_source, tmp_path, "gptq", quant_config_extra=extra)
    assert mc.Engine.from_pretrained(out, progress=False).quantization == "gptq"


def _set(name, value):
    def edit(tensors):
        tensors[name] = value(tensors[name])
    return edit


LAYER0 = "model.layers.0.self_attn.q_proj"
DOWN0 = "model.layers.0.mlp.down_proj"  # 256 inputs: two groups of 128


@pytest.mark.parametrize(
    "method,edit,match",
    [
        ("awq", _set(LAYER0 + ".qweight", lambda t: t[:, :-1].contiguous()), "qweight"),
        ("awq", _set(LAYER0 + ".scales", lambda t: t[:-1].contiguous()), "scales"),
        ("awq", _set(LAYER0 + ".qzeros", lambda t: t.float()), "qzeros.*dtype"),
        ("gptq", _set(LAYER0 + ".qweight", lambda t: t[:-1].contiguous()), "qweight"),
        ("gptq", _set(DOWN0 + ".g_idx", lambda t: t + 1), "g_idx.*outside"),
        ("gptq", _set(DOWN0 + ".g_idx", lambda t: -t), "g_idx.*outside"),
        ("gptq", _set(DOWN0 + ".g_idx", lambda t: t[:-1].contiguous()), "g_idx"),
        ("gptq", _set(DOWN0 + ".g_idx", lambda t: torch.zeros_like(t)), "g_idx.*group 0 256 input rows"),
        ("gptq", lambda t: t.pop(LAYER0 + ".qzeros"), "missing.*qzeros"),
    ],
)
def test_bad_packed_tensors_raise_checkpoint_error(packed_source, tmp_path, method, edit, match):
    out = edited_packed(packed_source, tmp_path, method, edit=edit)
    with pytest.raises(mc.CheckpointError, match=match):
        mc.Engine.from_pretrained(out, progress=False)


def test_act_order_differing_inside_a_fused_matrix_is_refused(packed_source, tmp_path):
    def edit(tensors):
        g = tensors["model.layers.0.self_attn.k_proj.g_idx"]
        tensors["model.layers.0.self_attn.k_proj.g_idx"] = g.flip(0).contiguous()
    out = edited_packed(packed_source, tmp_path, "gptq", edit=edit, act_order=True, group=64)
    with pytest.raises(mc.CheckpointError, match="g_idx orders the input differently"):
        mc.Engine.from_pretrained(out, progress=False)


def test_quantizing_a_packed_checkpoint_is_refused(packed_source, tmp_path):
    out = edited_packed(packed_source, tmp_path, "awq")
    with pytest.raises(mc.InvalidRequestError, match="already quantized"):
        mc.Engine.from_pretrained(out, quantization="int8", progress=False)


# --------------------------------------------------------------------------------------
# CUDA kernels vs the CPU ops (skip without a GPU)
# --------------------------------------------------------------------------------------


cuda = pytest.mark.skipif(not (mc._C.ops.has_cuda and torch.cuda.is_available()), reason="needs a CUDA GPU")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 4, 16, 17, 100])
@pytest.mark.parametrize("N,K", [(37, 256), (4096, 4096), (1024, 14336)])
def test_cuda_quantized_linear_matches_cpu(fmt, dtype, T, N, K):
    gen = torch.Generator().manual_seed(T + N + K)
    qw = ops.quantize(torch.randn(N, K, generator=gen) * 0.05, fmt)
    x = torch.randn(T, K, generator=gen).to(dtype)
    want = ops.quantized_linear(x.float(), qw)
    got = ops.quantized_linear(x.cuda(), qw.to("cuda"), out_dtype=torch.float32).cpu()
    err = float((got - want).norm() / want.norm())
    assert err <= 5e-3, f"{fmt} {dtype} T={T} {N}x{K}: {err:.3g}"


@cuda
@pytest.mark.cuda
def test_cuda_int4_col_perm_matches_cpu():
    gen = torch.Generator().manual_seed(3)
    base = ops.quantize(torch.randn(64, 512, generator=gen), "int4", 128)
    perm = torch.randperm(512, generator=gen).to(torch.int32)
    qw = ops.QuantizedWeight("int4", (64, 512), base.data, base.scales, base.zeros, 128, perm)
    x = torch.randn(3, 512, generator=gen).to(torch.bfloat16)
    want = ops.quantized_linear(x.float(), qw)
    got = ops.quantized_linear(x.cuda(), qw.to("cuda"), out_dtype=torch.float32).cpu()
    assert float((got - want).norm() / want.norm()) <= 5e-3


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("T", [1, 5, 64])
def test_cuda_quantized_moe_matches_cpu(fmt, T):
    gen = torch.Generator().manual_seed(T)
    E, D, F = 8, 256, 512
    x = torch.randn(T, D, generator=gen)
    router = torch.randn(E, D, generator=gen)
    w13 = ops.quantize(torch.randn(E, 2 * F, D, generator=gen) * 0.05, fmt)
    w2 = ops.quantize(torch.randn(E, D, F, generator=gen) * 0.05, fmt)
    xb = x.to(torch.bfloat16)
    want = ops.quantized_moe_ffn(xb.float(), router.to(torch.bfloat16).float(), w13, w2, 2)
    got = ops.quantized_moe_ffn(xb.cuda(), router.to(torch.bfloat16).cuda(), w13.to("cuda"), w2.to("cuda"), 2).cpu()
    assert float((got - want).norm() / want.norm()) <= 1e-2
