"""Paged KV cache behaviour: the sliding-window ring stays bounded, freed blocks are
reused, exhaustion raises CacheFullError and leaves the engine usable."""

from __future__ import annotations

import math

import pytest
import torch

import mistral_cuda as mc
import tiny_models as tm
from tiny_models import assert_logits_close, ring_bound

WINDOW = 8  # the mistral_sw / mixtral_sw fixtures


def _feed(m, s, ids, chunk, on_step=None):
    """Feed ``ids`` to sequence ``s`` ``chunk`` tokens per step; return all logits rows."""
    rows = []
    for start in range(0, len(ids), chunk):
        rows.append(m.step([(s, ids[start : start + chunk])], all_logits=True)[0])
        if on_step is not None:
            on_step(start + len(ids[start : start + chunk]))
    return torch.cat(rows)


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
@pytest.mark.parametrize("chunk", [1, 5, 13])
@pytest.mark.parametrize("which", ["mistral_sw", "mixtral_sw"])
def test_sliding_window_blocks_stay_bounded(which, block_size, chunk, request, load_engine):
    """Over 10x the window, a sliding-window sequence never holds more than
    ceil(W/block_size)+1 blocks (token by token, in chunks, and in chunks longer than
    the window), and its logits still match transformers at the end."""
    tiny = request.getfixturevalue(which)
    engine = load_engine(tiny, block_size=block_size)
    m = engine.model
    bound = ring_bound(WINDOW, block_size)
    ids = tiny.random_ids(10 * WINDOW + 3, tm.seed_of(f"ring-{which}-{block_size}-{chunk}"))
    s = m.add_sequence()
    seen = []

    def check(n_tokens):
        used = m.blocks_in_use(s)
        seen.append(used)
        assert used <= bound, f"{used} blocks after {n_tokens} tokens, bound {bound}"
        assert used * block_size >= min(n_tokens, WINDOW - 1), "cache smaller than the window"

    rows = _feed(m, s, ids, chunk, check)
    m.free_sequence(s)
    assert_logits_close(rows, tiny.reference_logits(ids), f"{which} block_size={block_size} chunk={chunk}")


@pytest.mark.parametrize("block_size", [2, 4, 16])
def test_sliding_window_runs_forever_in_a_pool_the_size_of_the_ring(mistral_sw, block_size, load_engine):
    """With num_blocks == ceil(W/block_size)+1 a sliding-window sequence decodes 10x the
    window without CacheFullError: the ring really reuses its blocks."""
    bound = ring_bound(WINDOW, block_size)
    engine = load_engine(mistral_sw, block_size=block_size, num_blocks=bound)
    ids = mistral_sw.random_ids(10 * WINDOW, tm.seed_of(f"tight-pool-{block_size}"))
    m = engine.model
    s = m.add_sequence()
    rows = _feed(m, s, ids, 1)
    m.free_sequence(s)
    assert_logits_close(rows, mistral_sw.reference_logits(ids), "decode in a ring-sized pool")
    # engine.logits with a long whole-prompt prefill in the same tight pool
    assert_logits_close(engine.logits(ids), mistral_sw.reference_logits(ids), "prefill in a ring-sized pool")


@pytest.mark.parametrize("block_size", [1, 4, 5])
def test_full_attention_blocks_grow_with_length(mistral_full, block_size, load_engine):
    """A full-attention sequence holds enough blocks for all its tokens (paged, so about
    ceil(n / block_size))."""
    m = load_engine(mistral_full, block_size=block_size).model
    ids = mistral_full.random_ids(40, tm.seed_of(f"full-growth-{block_size}"))
    s = m.add_sequence()

    def check(n):
        need = math.ceil(n / block_size)
        used = m.blocks_in_use(s)
        assert need <= used <= need + 1, f"{used} blocks for {n} tokens (block_size {block_size})"

    _feed(m, s, ids, 3, check)
    m.free_sequence(s)


def test_freeing_a_sequence_returns_its_blocks(mistral_full, load_engine):
    """A pool that fits one 32-token sequence: a second sequence can't grow until the
    first is freed, then it can use the returned blocks and its logits are right."""
    engine = load_engine(mistral_full, block_size=4, num_blocks=8)
    m = engine.model
    a_ids = mistral_full.random_ids(32, tm.seed_of("free-a"))
    b_ids = mistral_full.random_ids(30, tm.seed_of("free-b"))

    a = m.add_sequence()
    _feed(m, a, a_ids, 8)
    assert m.blocks_in_use(a) == 8
    b = m.add_sequence()
    with pytest.raises(mc.CacheFullError):
        m.step([(b, b_ids[:4])])
    m.free_sequence(a)

    rows = _feed(m, b, b_ids, 7)
    assert_logits_close(rows, mistral_full.reference_logits(b_ids), "sequence using freed blocks")
    assert m.blocks_in_use(b) == math.ceil(len(b_ids) / 4)
    m.free_sequence(b)
    # and the whole pool is free again for engine.logits
    assert_logits_close(engine.logits(a_ids), mistral_full.reference_logits(a_ids), "whole pool after frees")


def test_many_sequences_cycle_through_a_small_pool(mistral_sw, load_engine):
    """Allocate, free, allocate again many times: no blocks leak."""
    engine = load_engine(mistral_sw, block_size=4, num_blocks=ring_bound(WINDOW, 4))
    for i in range(12):
        ids = mistral_sw.random_ids(20 + i, tm.seed_of(f"cycle-{i}"))
        out = engine.logits(ids, chunk_size=3)
        if i % 4 == 0:
            assert_logits_close(out, mistral_sw.reference_logits(ids), f"cycle {i}")


def test_cache_exhaustion_raises_and_engine_stays_usable(mistral_full, load_engine):
    """Pool of 6 blocks of 4 tokens. A (16 tokens, 4 blocks) and B (6 tokens, 2 blocks)
    fill it; A's 17th token needs a 7th block -> CacheFullError. The failed step must not
    change A; B keeps decoding correctly inside its last block; after freeing B, retrying
    A's token works and A's logits are still right."""
    engine = load_engine(mistral_full, block_size=4, num_blocks=6)
    m = engine.model
    a_ids = mistral_full.random_ids(20, tm.seed_of("full-a"))
    b_ids = mistral_full.random_ids(8, tm.seed_of("full-b"))
    a, b = m.add_sequence(), m.add_sequence()
    a_rows = [m.step([(a, a_ids[:16])], all_logits=True)[0]]
    b_rows = [m.step([(b, b_ids[:6])], all_logits=True)[0]]
    assert m.blocks_in_use(a) == 4 and m.blocks_in_use(b) == 2

    with pytest.raises(mc.CacheFullError, match=r"(?i)block|cache|full|memory"):
        m.step([(a, [a_ids[16]])])
    assert m.blocks_in_use(a) == 4
    with pytest.raises(mc.CacheFullError):
        engine.logits(a_ids[:4])  # engine.logits needs a block too (and must free on failure)

    for t in b_ids[6:]:  # B still decodes (its 2nd block has room)
        b_rows.append(m.step([(b, [t])], all_logits=True)[0])
    assert_logits_close(torch.cat(b_rows), mistral_full.reference_logits(b_ids), "B after A's failure")
    m.free_sequence(b)

    a_rows.append(m.step([(a, a_ids[16:])], all_logits=True)[0])
    assert_logits_close(torch.cat(a_rows), mistral_full.reference_logits(a_ids), "A retried after free")
    m.free_sequence(a)
    whole = mistral_full.random_ids(24, tm.seed_of("full-whole"))  # exactly the 6 blocks
    assert_logits_close(engine.logits(whole), mistral_full.reference_logits(whole), "whole pool")


def test_engine_logits_prompt_larger_than_pool(mistral_full, load_engine):
    """engine.logits on a prompt needing more blocks than exist raises CacheFullError and
    releases what it took: a prompt that fits afterwards still works."""
    engine = load_engine(mistral_full, block_size=4, num_blocks=5)
    ids = mistral_full.random_ids(21, tm.seed_of("too-long"))
    for chunk in (None, 4):
        with pytest.raises(mc.CacheFullError):
            engine.logits(ids, chunk_size=chunk)
    assert_logits_close(engine.logits(ids[:20]), mistral_full.reference_logits(ids[:20]), "fits after failure")


def test_cache_full_error_is_runtime_error(mistral_full, load_engine):
    m = load_engine(mistral_full, block_size=2, num_blocks=1).model
    s = m.add_sequence()
    with pytest.raises(RuntimeError):
        m.step([(s, mistral_full.random_ids(3, 1))])
    m.free_sequence(s)
