// Reader of the safetensors format:
//   [u64 little-endian header length N][N bytes of JSON header][data]
// The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}, offsets
// relative to the start of the data. Everything is validated when the file is opened (shape
// products checked for overflow, offsets in range, non-overlapping and aligned to the element
// size), so a truncated or corrupt file is an error naming the problem, never an
// out-of-bounds or misaligned read.
//
// The file is memory-mapped: views share the page cache, and the file must then not be modified
// or truncated while a view is alive (a truncated mapping raises SIGBUS on access, an
// overwritten one changes the weights). read_into() copies a tensor with pread instead, never
// through the mapping: a loader that copies every tensor (LoadOptions::use_mmap = false) keeps
// no view, and the file may change freely once the load returns.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"

namespace mc {

struct SafetensorsEntry {
  std::string name;
  std::string dtype_name;       // as written in the header, e.g. "BF16"
  std::optional<DType> dtype;   // set for the float types the engine computes with
  std::vector<int64_t> shape;
  size_t offset = 0;            // byte offset from the start of the data section
  size_t nbytes = 0;
};

class SafetensorsFile : public std::enable_shared_from_this<SafetensorsFile> {
 public:
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, SafetensorsEntry>& entries() const { return entries_; }
  const SafetensorsEntry* find(const std::string& name) const;

  const void* data(const SafetensorsEntry& entry) const { return data_ + entry.offset; }
  // A zero-copy view of a float tensor that keeps the mapping alive.
  Tensor view(const SafetensorsEntry& entry);
  // Copies the tensor's bytes to dst (entry.nbytes) with pread, not through the mapping, so the
  // copied tensor's file pages never count in this process's resident memory.
  void read_into(const SafetensorsEntry& entry, void* dst) const;

 private:
  SafetensorsFile() = default;
  void parse_header();

  std::string path_;
  void* mapping_ = nullptr;
  int fd_ = -1;
  size_t file_size_ = 0;
  const uint8_t* data_ = nullptr;  // start of the data section
  size_t data_size_ = 0;
  std::map<std::string, SafetensorsEntry> entries_;
};

}  // namespace mc
