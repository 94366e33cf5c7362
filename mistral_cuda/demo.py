"""`mistral-cuda demo`: the whole path (load, chat template, prefill, streamed decode) on a
fresh machine with nothing downloaded.

The checkpoint is a small Mistral-architecture model with RANDOM weights, written once in
the real Hugging Face layout (config.json + model.safetensors) beside the real v1 tokenizer
that ships inside the mistral_common package.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

# Mistral-7B's shape scaled down; vocab 32000 to match the real v1 tokenizer.
DEMO_SHAPE = dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, hidden_dim=768, vocab_size=32000, sliding_window=256)
DEMO_NAME = "demo-mistral-d256-l4-random-v1"


def default_cache_dir() -> Path:
    return Path(os.environ.get("MISTRAL_CUDA_CACHE", Path.home() / ".cache" / "mistral_cuda"))


def v1_tokenizer_file() -> Path:
    try:
        import mistral_common
    except ImportError as e:
        raise RuntimeError(
            "the demo takes the real Mistral v1 tokenizer from the mistral_common package: "
            "pip install 'mistral-cuda[demo]' (or pip install mistral_common)"
        ) from e
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise RuntimeError(f"mistral_common has no v1 tokenizer at {path}")
    return path


def _hf_config(shape: dict) -> dict:
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": shape["dim"],
        "num_hidden_layers": shape["n_layers"],
        "num_attention_heads": shape["n_heads"],
        "num_key_value_heads": shape["n_kv_heads"],
        "head_dim": shape["dim"] // shape["n_heads"],
        "intermediate_size": shape["hidden_dim"],
        "vocab_size": shape["vocab_size"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "sliding_window": shape["sliding_window"],
        "max_position_embeddings": 32768,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def _random_weights(shape: dict, seed: int = 0) -> dict:
    """HF tensor names; N(0, 0.02) matrices like transformers' init, unit norm weights."""
    g = torch.Generator().manual_seed(seed)
    dim, hidden, vocab = shape["dim"], shape["hidden_dim"], shape["vocab_size"]
    head_dim = dim // shape["n_heads"]
    q_dim, kv_dim = shape["n_heads"] * head_dim, shape["n_kv_heads"] * head_dim

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g) * 0.02

    weights = {"model.embed_tokens.weight": matrix(vocab, dim), "model.norm.weight": torch.ones(dim)}
    for i in range(shape["n_layers"]):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = torch.ones(dim)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(dim)
        weights[p + "self_attn.q_proj.weight"] = matrix(q_dim, dim)
        weights[p + "self_attn.k_proj.weight"] = matrix(kv_dim, dim)
        weights[p + "self_attn.v_proj.weight"] = matrix(kv_dim, dim)
        weights[p + "self_attn.o_proj.weight"] = matrix(dim, q_dim)
        weights[p + "mlp.gate_proj.weight"] = matrix(hidden, dim)
        weights[p + "mlp.up_proj.weight"] = matrix(hidden, dim)
        weights[p + "mlp.down_proj.weight"] = matrix(dim, hidden)
    weights["lm_head.weight"] = matrix(vocab, dim)
    return weights


def demo_checkpoint(cache_dir: Path) -> tuple[Path, bool]:
    """The demo model directory, built on first use; returns (path, was_cached).

    Written to a temporary directory and renamed into place, so an interrupted build never
    leaves a half-written checkpoint behind."""
    from safetensors.torch import save_file

    path = Path(cache_dir) / DEMO_NAME
    if (path / "model.safetensors").is_file() and (path / "tokenizer.model").is_file():
        return path, True
    tokenizer = v1_tokenizer_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=DEMO_NAME + ".", dir=path.parent))
    try:
        (staging / "config.json").write_text(json.dumps(_hf_config(DEMO_SHAPE), indent=2))
        save_file(_random_weights(DEMO_SHAPE), str(staging / "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(tokenizer, staging / "tokenizer.model")
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path, False


def run_demo(cache_dir: Path, device: str, max_tokens: int) -> int:
    """`mistral-cuda demo`: what is shown goes to stdout, the statistics to stderr."""
    from mistral_cuda.cli import EXIT_INTERRUPTED, print_stream, stats_line
    from mistral_cuda.engine import Engine
    from mistral_cuda.sampling import SamplingParams

    path, cached = demo_checkpoint(cache_dir)
    shape = ", ".join(f"{k} {v}" for k, v in DEMO_SHAPE.items())
    print(f"Demo model ({shape}) {'cached at' if cached else 'built at'} {path}")
    print("Its weights are RANDOM: expect gibberish text. It shows the pipeline and its speed.")
    engine = Engine.from_pretrained(path, device=device)
    messages = [{"role": "user", "content": "Write a short poem about fast inference on GPUs."}]
    tokenizer = engine.tokenizer
    prompt_ids = tokenizer.encode_chat(messages)
    pieces = "".join(tokenizer.id_to_piece(i) for i in prompt_ids)
    print(f"Chat template ({tokenizer.version} tokenizer), as pieces: {pieces}")
    print(f"Prompt: {len(prompt_ids)} tokens; decoding {max_tokens} tokens on {engine.device}:")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=0, ignore_eos=True)
    output, interrupted = print_stream(engine.stream(prompt_ids, params))
    print(stats_line(output), file=sys.stderr)
    return EXIT_INTERRUPTED if interrupted else 0
