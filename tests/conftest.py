"""Shared fixtures for the mistral_cuda test suite.

The helpers themselves live in tiny_models.py (importable as ``tiny_models`` because this
directory is put on sys.path here)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny_models as tm  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU")


@pytest.fixture(autouse=True)
def _torch_determinism():
    """Each test starts from the same torch RNG state and uses few threads (2-core CI)."""
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(scope="session")
def mistral_sw(tmp_path_factory) -> tm.TinyModel:
    """Dense Mistral, sliding window 8, GQA 4 heads / 2 KV heads."""
    cfg = tm.mistral_config(sliding_window=8)
    return tm.make_hf_checkpoint(tmp_path_factory.mktemp("mistral_sw"), cfg, tm.seed_of("mistral_sw"))


@pytest.fixture(scope="session")
def mistral_full(tmp_path_factory) -> tm.TinyModel:
    """Dense Mistral with full attention (sliding_window=None), rope theta 5000."""
    cfg = tm.mistral_config(
        sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    return tm.make_hf_checkpoint(tmp_path_factory.mktemp("mistral_full"), cfg, tm.seed_of("mistral_full"))


@pytest.fixture(scope="session")
def mixtral_sw(tmp_path_factory) -> tm.TinyModel:
    """Mixtral, 4 experts top-2, sliding window 8."""
    cfg = tm.mixtral_config(num_local_experts=4, sliding_window=8)
    return tm.make_hf_checkpoint(tmp_path_factory.mktemp("mixtral_sw"), cfg, tm.seed_of("mixtral_sw"))


@pytest.fixture(scope="session")
def mistral_short(tmp_path_factory) -> tm.TinyModel:
    """Full-attention Mistral with max_position_embeddings=32 (for max_seq_len checks)."""
    cfg = tm.mistral_config(sliding_window=None, max_position_embeddings=32)
    return tm.make_hf_checkpoint(tmp_path_factory.mktemp("mistral_short"), cfg, tm.seed_of("mistral_short"))


@pytest.fixture
def load_engine():
    """``load_engine(tiny_model_or_path, **kwargs)`` -> mc.Engine on the CPU."""
    import mistral_cuda as mc

    def _load(model_or_path, **kwargs):
        path = model_or_path.path if isinstance(model_or_path, tm.TinyModel) else model_or_path
        kwargs.setdefault("device", "cpu")
        return mc.Engine.from_pretrained(str(path), **kwargs)

    return _load
