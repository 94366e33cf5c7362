"""Self-checks of the test helpers (no mistral_cuda needed): the oracle and the
checkpoint writers must be right for the engine tests to mean anything."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import tiny_models as tm


@pytest.mark.parametrize("n_heads,head_dim,dim2", [(4, 16, 64), (1, 8, 32), (2, 32, 64), (8, 2, 16)])
def test_unpermute_is_inverse_of_hf_permute(n_heads, head_dim, dim2):
    """permute(unpermute(w)) == w and unpermute(permute(w)) == w, and it is not the identity."""
    g = torch.Generator().manual_seed(tm.seed_of(f"perm-{n_heads}-{head_dim}"))
    w = torch.randn(n_heads * head_dim, dim2, generator=g)
    assert torch.equal(tm.hf_permute(tm.hf_unpermute(w, n_heads), n_heads), w)
    assert torch.equal(tm.hf_unpermute(tm.hf_permute(w, n_heads), n_heads), w)
    if head_dim > 2:
        assert not torch.equal(tm.hf_unpermute(w, n_heads), w)


def test_unpermute_maps_rotate_half_to_interleaved_pairs():
    """For one head of size 4: HF rows [x0, x1, y0, y1] (halves) are consolidated rows
    [x0, y0, x1, y1] (pairs)."""
    w = torch.arange(4.0).unsqueeze(1)  # rows 0..3 = HF order
    assert tm.hf_unpermute(w, 1).squeeze(1).tolist() == [0.0, 2.0, 1.0, 3.0]


def test_reference_sliding_window_is_in_effect():
    """The oracle really applies the window: identical to full attention for the first W
    positions, different afterwards."""
    sw = tm.build_model(tm.mistral_config(sliding_window=8), 123)
    full = tm.build_model(tm.mistral_config(sliding_window=None), 123)
    full.load_state_dict(sw.state_dict())
    ids = tm.random_ids(30, 256, 7)
    a, b = tm.reference_logits(sw, ids), tm.reference_logits(full, ids)
    assert torch.allclose(a[:8], b[:8], atol=1e-5)
    assert not torch.allclose(a[8:], b[8:], atol=1e-2)


def test_logits_are_not_degenerate():
    """Random weights are large enough that logits are spread out (not ~0)."""
    m = tm.build_model(tm.mistral_config(), 1)
    logits = tm.reference_logits(m, tm.random_ids(20, 256, 2))
    assert logits.std() > 0.3


def test_mixtral_checkpoint_uses_legacy_expert_names(tmp_path):
    """transformers 5 saves Mixtral experts as block_sparse_moe.experts.E.w{1,2,3}."""
    tm.make_hf_checkpoint(tmp_path, tm.mixtral_config(num_local_experts=4), 5)
    names = set(tm.read_checkpoint_tensors(tmp_path))
    for e in range(4):
        for w in ("w1", "w2", "w3"):
            assert f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_consolidated_writer_names_and_shapes(kind, tmp_path):
    cfg = tm.mistral_config(head_dim=32) if kind == "mistral" else tm.mixtral_config()
    tiny = tm.make_hf_checkpoint(tmp_path / "hf", cfg, 9)
    out = tm.write_consolidated(tiny.path, tmp_path / "c", cfg)
    params = json.loads((out / "params.json").read_text())
    tensors = load_file(str(out / "consolidated.safetensors"))
    hd = params["head_dim"]
    assert tensors["tok_embeddings.weight"].shape == (params["vocab_size"], params["dim"])
    assert tensors["output.weight"].shape == (params["vocab_size"], params["dim"])
    assert tensors["layers.1.attention.wq.weight"].shape == (params["n_heads"] * hd, params["dim"])
    assert tensors["layers.1.attention.wk.weight"].shape == (params["n_kv_heads"] * hd, params["dim"])
    assert tensors["layers.1.attention.wo.weight"].shape == (params["dim"], params["n_heads"] * hd)
    if kind == "mixtral":
        assert params["moe"] == {"num_experts": 4, "num_experts_per_tok": 2}
        assert tensors["layers.0.feed_forward.gate.weight"].shape == (4, params["dim"])
        assert tensors["layers.0.feed_forward.experts.3.w2.weight"].shape == (params["dim"], params["hidden_dim"])
    else:
        assert tensors["layers.0.feed_forward.w1.weight"].shape == (params["hidden_dim"], params["dim"])
    # wq/wk round-trip to the HF weights through HF's own permutation
    hf = tm.read_checkpoint_tensors(tiny.path)
    assert torch.equal(
        tm.hf_permute(tensors["layers.0.attention.wk.weight"], params["n_kv_heads"]),
        hf["model.layers.0.self_attn.k_proj.weight"],
    )
    assert len(tensors) == len(hf)


def test_bf16_checkpoint_round_trips(tmp_path):
    tiny = tm.make_bf16_checkpoint(tmp_path, tm.mistral_config(), 3)
    on_disk = tm.read_checkpoint_tensors(tmp_path)
    assert all(t.dtype == torch.bfloat16 for t in on_disk.values())
    sd = tiny.model.state_dict()
    assert sd["lm_head.weight"].dtype == torch.float32
    assert torch.equal(on_disk["lm_head.weight"].float(), sd["lm_head.weight"])


def test_raw_safetensors_round_trip(tmp_path, mistral_sw):
    """read_raw_safetensors/write_raw_safetensors reproduce a loadable file."""
    header, data = tm.read_raw_safetensors(mistral_sw.path / "model.safetensors")
    out = tm.write_raw_safetensors(tmp_path / "copy.safetensors", header, data)
    a = load_file(str(out))
    b = load_file(str(mistral_sw.path / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", sorted(tm.CORRUPTIONS))
def test_corrupt_files_are_rejected_by_safetensors(name, tmp_path, mistral_sw):
    """Each hand-made corruption is really invalid: the safetensors library refuses it."""
    dst = tmp_path / "model.safetensors"
    tm.CORRUPTIONS[name](mistral_sw.path / "model.safetensors", dst)
    with pytest.raises(Exception) as info:
        with safe_open(str(dst), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    assert not isinstance(info.value, AssertionError)
