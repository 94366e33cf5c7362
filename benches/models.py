"""Random Mistral-shaped checkpoints for the CPU benchmarks, written as real Hugging Face
checkpoints (config.json + model.safetensors + the real v1 tokenizer.model from mistral_common),
so that mistral_cuda, transformers and llama.cpp's converter all load the same files.

    import models  # with benches/ on sys.path, as the benches do
    path = models.random_mistral_checkpoint(models.SHAPE_1B, dtype="bfloat16")  # ~1.07B params, 2.1 GB

Weights are N(0, 0.02) like transformers' init, norms are ones. Every value is drawn in
float32 and rounded to bfloat16 before it is stored in the checkpoint's dtype, so for one seed
the float32 and bfloat16 checkpoints hold exactly the same model (and float16 the same but for
a few values below float16's normal range): f32 and bf16 runs compare equal weights, and the
f32 GGUF converted from either is the same file. Only one tensor at a time is ever held in
float32, so the bf16 1B model needs ~2.2 GB of memory to write, not 4.3 GB.

Checkpoints are cached under `default_cache_dir()/bench` (~/.cache/mistral_cuda/bench, or
$MISTRAL_CUDA_CACHE/bench), outside the repository; a checkpoint is written to a temporary
directory and renamed into place, so an interrupted write leaves nothing half-done behind.

`python benches/models.py [--dtype bfloat16|float32|float16] [--shape 1b|57m|demo]` writes one and prints its path.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from mistral_cuda.demo import DEMO_SHAPE, _hf_config, default_cache_dir, v1_tokenizer_file

# ~1.07B parameters: TinyLlama-like width (dim 2048, head_dim 128, GQA 2:1), 20 layers.
# 20 x 47.2M per layer + 2 x 65.5M embedding/lm_head = 1,075M.
SHAPE_1B = dict(dim=2048, n_layers=20, n_heads=16, n_kv_heads=8, hidden_dim=5632, vocab_size=32000, sliding_window=4096)
# bench_cpu.py's ~57M model (hidden 512, 8 layers, 8/2 heads, head_dim 64, intermediate 1536).
SHAPE_57M = dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, hidden_dim=1536, vocab_size=32000, sliding_window=4096)
SHAPES = {"1b": SHAPE_1B, "57m": SHAPE_57M, "demo": DEMO_SHAPE}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def param_count(shape: dict) -> int:
    """Parameters of a Mistral of this shape (untied embedding and lm_head)."""
    d, L, V, ff = shape["dim"], shape["n_layers"], shape["vocab_size"], shape["hidden_dim"]
    head_dim = d // shape["n_heads"]
    q, kv = shape["n_heads"] * head_dim, shape["n_kv_heads"] * head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * ff + 2 * d
    return 2 * V * d + L * per_layer + d


def checkpoint_name(shape: dict, dtype: str, seed: int) -> str:
    return (
        f"mistral-d{shape['dim']}-l{shape['n_layers']}-h{shape['n_heads']}kv{shape['n_kv_heads']}"
        f"-ff{shape['hidden_dim']}-v{shape['vocab_size']}-{dtype}-seed{seed}"
    )


def _random_weights(shape: dict, dtype: torch.dtype, seed: int) -> dict:
    """HF tensor names, in HF's order; each matrix drawn in float32, rounded to bfloat16."""
    g = torch.Generator().manual_seed(seed)
    dim, hidden, vocab = shape["dim"], shape["hidden_dim"], shape["vocab_size"]
    head_dim = dim // shape["n_heads"]
    q_dim, kv_dim = shape["n_heads"] * head_dim, shape["n_kv_heads"] * head_dim

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16).to(dtype)

    def ones() -> torch.Tensor:
        return torch.ones(dim, dtype=dtype)

    weights = {"model.embed_tokens.weight": matrix(vocab, dim)}
    for i in range(shape["n_layers"]):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = ones()
        weights[p + "post_attention_layernorm.weight"] = ones()
        weights[p + "self_attn.q_proj.weight"] = matrix(q_dim, dim)
        weights[p + "self_attn.k_proj.weight"] = matrix(kv_dim, dim)
        weights[p + "self_attn.v_proj.weight"] = matrix(kv_dim, dim)
        weights[p + "self_attn.o_proj.weight"] = matrix(dim, q_dim)
        weights[p + "mlp.gate_proj.weight"] = matrix(hidden, dim)
        weights[p + "mlp.up_proj.weight"] = matrix(hidden, dim)
        weights[p + "mlp.down_proj.weight"] = matrix(dim, hidden)
    weights["model.norm.weight"] = ones()
    weights["lm_head.weight"] = matrix(vocab, dim)
    return weights


def random_mistral_checkpoint(
    shape: dict = SHAPE_1B, dtype: str = "bfloat16", seed: int = 0, cache_dir: Optional[Path] = None
) -> Path:
    """The directory of a random MistralForCausalLM checkpoint of `shape` stored in `dtype`
    ("bfloat16", "float32" or "float16"), written on first use and reused after."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "bench"
    path = cache_dir / checkpoint_name(shape, dtype, seed)
    if (path / "model.safetensors").is_file() and (path / "tokenizer.model").is_file():
        return path
    tokenizer = v1_tokenizer_file()
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=cache_dir))
    try:
        config = dict(_hf_config(shape), torch_dtype=dtype)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        save_file(_random_weights(shape, DTYPES[dtype], seed), str(staging / "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(tokenizer, staging / "tokenizer.model")
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="write a random Mistral checkpoint for the CPU benchmarks")
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=None)
    args = p.parse_args()
    shape = SHAPES[args.shape]
    path = random_mistral_checkpoint(shape, args.dtype, args.seed, args.cache_dir)
    print(f"{path}  ({param_count(shape) / 1e9:.3f}B parameters, {args.dtype})")


if __name__ == "__main__":
    main()
