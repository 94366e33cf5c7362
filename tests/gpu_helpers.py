"""Shared pieces of the GPU test files: the skip rule, input makers, and the comparison rules.

Rules: an op's relative error against the CPU op on float32 copies of the same (rounded)
inputs must be <= 2 x the error of a plain torch implementation in the same dtype on the GPU
+ 1e-5 (flash-attention's rule); a whole model's error against transformers float32 must be
<= 2 x transformers' own bf16 error on the GPU + an absolute slack. NaN never passes.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mistral_cuda as mc
import tiny_models as tm


def cuda_ready() -> bool:
    """A GPU torch can use, and mistral_cuda built with CUDA seeing one."""
    try:
        return bool(torch.cuda.is_available() and mc.cuda_compiled() and mc.cuda_device_count() > 0)
    except Exception:
        return False


requires_cuda = pytest.mark.skipif(not cuda_ready(), reason="needs an NVIDIA GPU and mistral_cuda built with CUDA")


def ops():
    """mistral_cuda.testing, imported at call time so that collecting a test file never needs it."""
    from mistral_cuda import testing as mc_ops

    return mc_ops


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(shape, seed: int, dtype, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """float32 CPU tensor of randn * scale + offset, rounded to `dtype` (exact in it)."""
    x = torch.randn(shape, generator=gen(seed)) * scale + offset
    return x.to(dtype).to(torch.float32)


def on(x: torch.Tensor, device, dtype=None) -> torch.Tensor:
    """A copy of x on the device (never an alias, even when nothing changes)."""
    return x.to(device=device, dtype=dtype or x.dtype, copy=True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    a = out.detach().to("cpu", torch.float64)
    b = ref.detach().to("cpu", torch.float64)
    return float((a - b).norm() / b.norm())


def assert_close_2x(out, ref, base, what: str):
    """err(out) <= 2 * err(base) + 1e-5 against ref (all relative Frobenius errors).
    Returns (err(out), err(base))."""
    assert tuple(out.shape) == tuple(ref.shape), f"{what}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert torch.isfinite(ref).all(), f"{what}: the CPU reference is not finite (CPU op or test bug)"
    assert float(ref.double().norm()) > 0, f"{what}: the reference is all zeros"
    assert torch.isfinite(base.float()).all(), f"{what}: the plain torch version is not finite (test bug)"
    bad = int((~torch.isfinite(out.float())).sum())
    assert bad == 0, f"{what}: {bad} of {out.numel()} output values are NaN/inf"
    e_op, e_base = rel_err(out, ref), rel_err(base, ref)
    assert e_op <= 2 * e_base + 1e-5, (
        f"{what}: relative error {e_op:.3g} > 2 x plain-torch error {e_base:.3g} + 1e-5"
    )
    return e_op, e_base


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return tm.logits_error(actual, expected)[0]


def transformers_gpu(model, dtype=torch.bfloat16):
    """The transformers model in `dtype` on the GPU. Only the parameters are cast: the rotary
    inv_freq buffer stays float32, as when transformers loads a bf16 checkpoint."""
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.data = p.data.to(dtype)
    return m.to("cuda").eval()


def transformers_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([list(ids)], device="cuda"), use_cache=False)
    return out.logits[0].float().cpu()


def cuda_engine(tiny, **kw):
    kw.setdefault("device", "cuda")
    return mc.Engine.from_pretrained(str(tiny.path), progress=False, **kw)


def cpu_engine(tiny, **kw):
    return mc.Engine.from_pretrained(str(tiny.path), device="cpu", progress=False, **kw)


def assert_within(out, ref, hf_err: float, what: str, slack: float = 1e-3, detail=None) -> float:
    """err(out vs ref) <= 2 * hf_err + slack; out must be float32 [n, vocab] on the CPU, finite.
    detail(out, ref), if given, adds a description of the worst rows to the failure message."""
    assert isinstance(out, torch.Tensor), f"{what}: got {type(out)}"
    assert out.dtype == torch.float32, f"{what}: dtype {out.dtype}"
    assert out.device.type == "cpu", f"{what}: logits on {out.device}, expected the CPU"
    assert tuple(out.shape) == tuple(ref.shape), f"{what}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    bad = int((~torch.isfinite(out)).sum())
    assert bad == 0, f"{what}: {bad} NaN/inf logits"
    err = rel(out, ref)
    assert err <= 2 * hf_err + slack, (
        f"{what}: relative error {err:.3g} > 2 x transformers bf16 error {hf_err:.3g} + {slack}"
        + (detail(out, ref) if detail else "")
    )
    return err
