#include "core/block_manager.h"

#include <algorithm>
#include <set>

#include "core/error.h"

namespace mc {

BlockManager::BlockManager(KvLayout layout, int64_t num_blocks) : layout_(layout), num_blocks_(num_blocks) {
  if (layout.block_size <= 0) fail(ErrorKind::kInvalidRequest, "block_size must be positive, got ", layout.block_size);
  if (num_blocks <= 0 || num_blocks > INT32_MAX)
    fail(ErrorKind::kInvalidRequest, "num_blocks must be in 1..", INT32_MAX, ", got ", num_blocks);
  free_.reserve(num_blocks);
  // Pop order hands out block 0 first, which keeps small runs compact in memory.
  for (int64_t block = num_blocks - 1; block >= 0; --block) free_.push_back(static_cast<int32_t>(block));
}

int32_t BlockManager::add_sequence() {
  int32_t id = next_id_++;
  sequences_.emplace(id, Sequence{});
  return id;
}

int32_t BlockManager::fork_sequence(int32_t src, std::vector<std::pair<int32_t, int32_t>>* copies) {
  if (free_blocks() < blocks_in_use(src))
    fail(ErrorKind::kCacheFull, "KV cache is full: forking sequence ", src, " needs ", blocks_in_use(src), " blocks");
  Sequence copy = get(src);
  for (int32_t& block : copy.table) {
    if (block < 0) continue;
    copies->emplace_back(block, free_.back());
    block = free_.back();
    free_.pop_back();
  }
  const int32_t id = next_id_++;
  sequences_.emplace(id, std::move(copy));
  return id;
}

void BlockManager::require_sequence(int32_t seq) const {
  if (!has_sequence(seq)) fail(ErrorKind::kInvalidRequest, "unknown sequence id ", seq);
}

BlockManager::Sequence& BlockManager::get(int32_t seq) {
  require_sequence(seq);
  return sequences_.at(seq);
}

const BlockManager::Sequence& BlockManager::get(int32_t seq) const {
  require_sequence(seq);
  return sequences_.at(seq);
}

void BlockManager::free_sequence(int32_t seq) {
  Sequence& sequence = get(seq);
  for (int32_t block : sequence.table) {
    if (block < 0) continue;
    free_.push_back(block);
  }
  sequences_.erase(seq);
}

int64_t BlockManager::length(int32_t seq) const { return get(seq).length; }

void BlockManager::set_length(int32_t seq, int64_t length) { get(seq).length = length; }

int64_t BlockManager::blocks_in_use(int32_t seq) const {
  const auto& table = get(seq).table;
  return std::count_if(table.begin(), table.end(), [](int32_t block) { return block >= 0; });
}

const std::vector<int32_t>& BlockManager::table(int32_t seq) const { return get(seq).table; }

int64_t BlockManager::blocks_needed(int32_t seq, const std::vector<std::pair<int64_t, int64_t>>& ranges) const {
  const auto& table = get(seq).table;
  // Table entries the ranges touch (ring entries repeat across chunks of a long prompt).
  std::set<int64_t> touched;
  for (const auto& [begin, end] : ranges)
    for (int64_t block = layout_.logical_block(begin); end > begin && block <= layout_.logical_block(end - 1); ++block)
      touched.insert(layout_.table_index(block * layout_.block_size));
  int64_t needed = 0;
  for (int64_t index : touched)
    if (index >= static_cast<int64_t>(table.size()) || table[index] < 0) ++needed;
  return needed;
}

void BlockManager::allocate(int32_t seq, int64_t begin, int64_t end) {
  if (end <= begin) return;
  auto& table = get(seq).table;
  for (int64_t block = layout_.logical_block(begin); block <= layout_.logical_block(end - 1); ++block) {
    int64_t index = layout_.table_index(block * layout_.block_size);
    if (index >= static_cast<int64_t>(table.size())) table.resize(index + 1, -1);
    if (table[index] >= 0) continue;
    if (free_.empty()) fail(ErrorKind::kCacheFull, "KV cache is full: no free block");
    table[index] = free_.back();
    free_.pop_back();
  }
}

}  // namespace mc
