"""Writes the fuzzers' seed corpus from real tiny checkpoints (built with transformers, as the
tests build theirs): one directory per fuzz target under OUT_DIR.

    python3 fuzz/make_corpus.py OUT_DIR

Seeds: the configs, index and safetensors files of a dense Mistral (single-file, sharded, bf16,
Mistral consolidated) and a Mixtral, each small enough for libFuzzer's input limit, packed for
fuzz_checkpoint_dir as described in fuzz_checkpoint_dir.cpp (pack_dir / unpack_dir below).
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import tiny_models as tm  # noqa: E402

TARGETS = ("fuzz_json", "fuzz_safetensors", "fuzz_config", "fuzz_checkpoint_dir")
SHARD = "model-00001-of-00001.safetensors"
MISTRAL, SHARDED, PRIVATE = 1, 2, 4  # fuzz_checkpoint_dir flags


def tiny_config(moe: bool, **overrides):
    shapes = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=32, max_position_embeddings=64, sliding_window=4)
    shapes.update(overrides)
    return tm.mixtral_config(num_local_experts=2, **shapes) if moe else tm.mistral_config(**shapes)


def pack_dir(flags: int, config: bytes, weights: bytes, index: bytes = b"") -> bytes:
    """One fuzz_checkpoint_dir input."""
    blob = bytes([flags]) + struct.pack("<H", len(config)) + config
    if flags & SHARDED:
        blob += struct.pack("<H", len(index)) + index
    return blob + weights


def unpack_dir(blob: bytes, out: Path) -> bool:
    """The model directory an input stands for (what the C++ target writes); use_mmap."""
    flags, rest = blob[0], blob[1:]
    (n,) = struct.unpack("<H", rest[:2])
    config, rest = rest[2 : 2 + n], rest[2 + n :]
    mistral, sharded = flags & MISTRAL, not flags & MISTRAL and flags & SHARDED
    (out / ("params.json" if mistral else "config.json")).write_bytes(config)
    if sharded:
        (m,) = struct.unpack("<H", rest[:2])
        (out / "model.safetensors.index.json").write_bytes(rest[2 : 2 + m])
        rest = rest[2 + m :]
    name = "consolidated.safetensors" if mistral else SHARD if sharded else "model.safetensors"
    (out / name).write_bytes(rest)
    return not flags & PRIVATE


def checkpoints(work: Path):
    """(name, flags, config bytes, safetensors bytes, index bytes) of each seed checkpoint."""
    for name, moe in (("mistral", False), ("mixtral", True)):
        tiny = tm.make_hf_checkpoint(work / name, tiny_config(moe), tm.seed_of("corpus-" + name))
        config = (tiny.path / "config.json").read_bytes()
        weights = (tiny.path / "model.safetensors").read_bytes()
        yield name, 0, config, weights, b""
        yield name + "-private", PRIVATE, config, weights, b""
        header, _ = tm.read_raw_safetensors(tiny.path / "model.safetensors")
        index = {"metadata": {"total_size": len(weights)},
                 "weight_map": {k: SHARD for k in header if k != "__metadata__"}}
        yield name + "-sharded", SHARDED, config, weights, json.dumps(index).encode()
        consolidated = tm.write_consolidated(tiny.path, work / (name + "-consolidated"), tiny.config)
        yield (name + "-consolidated", MISTRAL, (consolidated / "params.json").read_bytes(),
               (consolidated / "consolidated.safetensors").read_bytes(), b"")
    bf16 = tm.make_bf16_checkpoint(work / "bf16", tiny_config(False, tie_word_embeddings=True), tm.seed_of("corpus-bf16"))
    yield "bf16-tied", 0, (bf16.path / "config.json").read_bytes(), (bf16.path / "model.safetensors").read_bytes(), b""


def write_corpus(out_dir: Path) -> dict[str, list[Path]]:
    out_dir = Path(out_dir)
    dirs = {target: out_dir / target for target in TARGETS}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {target: [] for target in TARGETS}

    def seed(target: str, name: str, data: bytes) -> None:
        path = dirs[target] / name
        path.write_bytes(data)
        written[target].append(path)

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        for name, flags, config, weights, index in checkpoints(Path(tmp)):
            seed("fuzz_checkpoint_dir", name, pack_dir(flags, config, weights, index))
            seed("fuzz_safetensors", name, bytes([flags & PRIVATE]) + weights)
            seed("fuzz_config", name, config)
            seed("fuzz_json", name + "-config", config)
            (n,) = struct.unpack("<Q", weights[:8])
            seed("fuzz_json", name + "-header", weights[8 : 8 + n])
            if index:
                seed("fuzz_json", name + "-index", index)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for target, paths in write_corpus(Path(sys.argv[1])).items():
        print(f"{target}: {len(paths)} seeds, {sum(p.stat().st_size for p in paths)} bytes")
