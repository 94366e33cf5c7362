// Host-side bookkeeping of the paged KV cache: which physical blocks are free, and each
// sequence's block table and length. The pools themselves belong to a backend.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <vector>

#include "core/kv_layout.h"

namespace mc {

class BlockManager {
 public:
  BlockManager(KvLayout layout, int64_t num_blocks);

  const KvLayout& layout() const { return layout_; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }

  int32_t add_sequence();
  // A new sequence with `src`'s length and a table of fresh blocks in the same slots (the
  // caller copies the contents); fills `copies` with (src block, new block) pairs. The caller
  // has checked free_blocks() >= blocks_in_use(src).
  int32_t fork_sequence(int32_t src, std::vector<std::pair<int32_t, int32_t>>* copies);
  void free_sequence(int32_t seq);  // throws kInvalidRequest for an unknown id
  bool has_sequence(int32_t seq) const { return sequences_.count(seq) != 0; }
  size_t num_sequences() const { return sequences_.size(); }
  void require_sequence(int32_t seq) const;

  int64_t length(int32_t seq) const;
  void set_length(int32_t seq, int64_t length);
  int64_t blocks_in_use(int32_t seq) const;
  // Block table, one entry per logical block (or ring entry); -1 = not allocated yet.
  const std::vector<int32_t>& table(int32_t seq) const;

  // Blocks that writing positions [begin, end) of `seq` would newly allocate, for each range of
  // `ranges` in turn (the chunks one step writes).
  int64_t blocks_needed(int32_t seq, const std::vector<std::pair<int64_t, int64_t>>& ranges) const;
  // Allocates them; the caller has checked free_blocks() covers every entry of the step.
  void allocate(int32_t seq, int64_t begin, int64_t end);

 private:
  struct Sequence {
    int64_t length = 0;
    std::vector<int32_t> table;
  };
  Sequence& get(int32_t seq);
  const Sequence& get(int32_t seq) const;

  KvLayout layout_;
  std::vector<int32_t> free_;  // stack of free physical blocks
  int64_t num_blocks_ = 0;
  std::map<int32_t, Sequence> sequences_;
  int32_t next_id_ = 0;
};

}  // namespace mc
