// Index math of the paged KV cache, shared by the CPU backend and the CUDA kernels.
//
// Per layer, K and V live in pools shaped [num_blocks, block_size, n_kv_heads, head_dim].
// A sequence owns a block table: entry i names the physical block holding logical block i.
// Position p sits in logical block p / block_size at slot p % block_size.
//
// Sliding window W: a query at position p sees keys p-W+1 .. p. Those span at most
// R = ceil(W / block_size) + 1 logical blocks, so the table is a ring of R entries and logical
// block L lives in entry L % R. Worked example: W=7, block_size=4 -> R=3; at p=13 the live
// positions 7..13 are logical blocks 1..3 -> ring entries 1, 2, 0.
// Keys are cached after RoPE at their absolute positions, so a wrapped ring needs no
// re-rotation, and masks compare absolute positions, never slots.
#pragma once

#include <cstdint>

#include "core/hd.h"

namespace mc {

struct KvLayout {
  int32_t block_size = 16;
  int32_t ring_blocks = 0;  // R for a sliding window; 0 = full attention, the table only grows
  int64_t window = 0;       // W; 0 = full attention

  MC_HD static int32_t ring_blocks_for(int64_t window, int32_t block_size) {
    return window > 0 ? static_cast<int32_t>((window + block_size - 1) / block_size + 1) : 0;
  }
  // The layout of a cache with this block size and window (0 = full attention).
  MC_HD static KvLayout make(int32_t block_size, int64_t window) {
    KvLayout layout;
    layout.block_size = block_size;
    layout.window = window;
    layout.ring_blocks = ring_blocks_for(window, block_size);
    return layout;
  }

  MC_HD int64_t logical_block(int64_t pos) const { return pos / block_size; }
  MC_HD int32_t slot_in_block(int64_t pos) const { return static_cast<int32_t>(pos % block_size); }
  // Index into the sequence's block table of the block holding `pos`.
  MC_HD int64_t table_index(int64_t pos) const {
    int64_t block = logical_block(pos);
    return ring_blocks > 0 ? block % ring_blocks : block;
  }
  // Row of `pos` in a pool viewed as [num_blocks * block_size, n_kv_heads, head_dim].
  MC_HD int64_t pool_row(const int32_t* block_table, int64_t pos) const {
    return static_cast<int64_t>(block_table[table_index(pos)]) * block_size + slot_in_block(pos);
  }
  // First key position visible from a query at `q_pos` (causal + sliding window).
  MC_HD int64_t first_visible(int64_t q_pos) const {
    return window > 0 && q_pos - window + 1 > 0 ? q_pos - window + 1 : 0;
  }
  // First position of a chunk ending before `end` whose K/V must stay cached for later queries:
  // the last W positions under a window, every position otherwise.
  MC_HD int64_t first_kept(int64_t begin, int64_t end) const {
    return window > 0 && end - window > begin ? end - window : begin;
  }
};

// Where the K/V row of position `pos` lives for a query of an entry whose cached prefix ends at
// `start` and whose new tokens start at step row `first_token`: positions >= start are this
// step's own (fresh: row of k_new/v_new [T, KVH, Dh]), older ones are cached (row of the pool
// viewed as [num_blocks * block_size, KVH, Dh]). Worked example: start=10, first_token=3,
// pos=12 -> fresh row 5; pos=4 with block_size 4 -> pool row table[1] * 4 + 0.
struct KvRow {
  bool fresh;
  int64_t row;
};
MC_HD inline KvRow kv_row(const KvLayout& layout, const int32_t* table, int64_t start, int64_t first_token,
                          int64_t pos) {
  if (pos >= start) return {true, first_token + (pos - start)};
  return {false, layout.pool_row(table, pos)};
}

// GQA: the G = n_heads / n_kv_heads query heads of kv head k are k * G .. k * G + G - 1 (query
// head h reads kv head h / G). Worked example, Mistral-7B: 32 / 8 -> G = 4; kv head 2 serves
// query heads 8..11. Kernels that load each K/V row once serve the whole group from it.
MC_HD inline int32_t query_group_size(int32_t n_heads, int32_t n_kv_heads) { return n_heads / n_kv_heads; }
MC_HD inline int32_t query_head(int32_t kv_head, int32_t g, int32_t group) { return kv_head * group + g; }
MC_HD inline int32_t kv_head_of(int32_t q_head, int32_t n_heads, int32_t n_kv_heads) {
  return q_head / query_group_size(n_heads, n_kv_heads);
}

}  // namespace mc
