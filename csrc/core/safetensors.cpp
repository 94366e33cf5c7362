#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "core/checked_math.h"
#include "core/error.h"
#include "core/json.h"

namespace mc {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // the format's own reader caps it likewise
constexpr int64_t kMaxElements = int64_t{1} << 48;  // per tensor; far above any real weight

// Element size of every dtype the safetensors format defines; 0 = unknown.
size_t element_size(const std::string& name) {
  static const std::map<std::string, size_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"F8_E8M0", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},     {"U32", 4},
      {"F32", 4},  {"I64", 8}, {"U64", 8}, {"F64", 8},     {"C64", 8}};
  auto it = sizes.find(name);
  return it == sizes.end() ? 0 : it->second;
}

std::optional<DType> float_dtype(const std::string& name) {
  if (name == "F32") return DType::kF32;
  if (name == "BF16") return DType::kBF16;
  if (name == "F16") return DType::kF16;
  return std::nullopt;
}

}  // namespace

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) fail(ErrorKind::kFileNotFound, "no such file: ", path);
    fail(ErrorKind::kCheckpoint, "cannot open ", path, ": ", std::strerror(errno));
  }
  struct stat info {};
  if (fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
    ::close(fd);
    fail(ErrorKind::kCheckpoint, path, " is not a regular file");
  }
  file->file_size_ = static_cast<size_t>(info.st_size);
  if (file->file_size_ < 8) {
    ::close(fd);
    fail(ErrorKind::kCheckpoint, path, ": file of ", file->file_size_,
         " bytes is too small to hold a safetensors header (truncated?)");
  }
  void* mapping = mmap(nullptr, file->file_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  if (mapping == MAP_FAILED) {
    ::close(fd);
    fail(ErrorKind::kCheckpoint, "cannot mmap ", path, ": ", std::strerror(errno));
  }
  file->fd_ = fd;  // kept for read_into(): copies never touch (and never make resident) the mapping
  file->mapping_ = mapping;
  file->parse_header();
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_ != nullptr) munmap(mapping_, file_size_);
  if (fd_ >= 0) ::close(fd_);
}

void SafetensorsFile::parse_header() {
  const auto* bytes = static_cast<const uint8_t*>(mapping_);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  if (header_len > file_size_ - 8)
    fail(ErrorKind::kCheckpoint, path_, ": header length ", header_len, " runs past the end of the file (",
         file_size_, " bytes; truncated or not a safetensors file)");
  if (header_len > kMaxHeaderBytes)
    fail(ErrorKind::kCheckpoint, path_, ": header length ", header_len, " exceeds the ", kMaxHeaderBytes,
         "-byte limit");
  data_ = bytes + 8 + header_len;
  data_size_ = file_size_ - 8 - header_len;

  std::string text(reinterpret_cast<const char*>(bytes + 8), header_len);
  Json header;
  try {
    header = Json::parse(text);
  } catch (const Error& e) {
    fail(ErrorKind::kCheckpoint, path_, ": header is not valid JSON (", e.what(), ")");
  }
  if (!header.is_object()) fail(ErrorKind::kCheckpoint, path_, ": header must be a JSON object");

  std::vector<const SafetensorsEntry*> by_offset;
  for (const auto& [name, value] : header.object("header")) {
    if (name == "__metadata__") continue;
    const std::string what = path_ + ": tensor '" + name + "'";
    if (!value.is_object()) fail(ErrorKind::kCheckpoint, what, " must be described by an object");
    const Json* dtype = value.find("dtype");
    const Json* shape = value.find("shape");
    const Json* offsets = value.find("data_offsets");
    if (!dtype || !shape || !offsets)
      fail(ErrorKind::kCheckpoint, what, " needs 'dtype', 'shape' and 'data_offsets'");

    SafetensorsEntry entry;
    entry.name = name;
    entry.dtype_name = dtype->string(what + " dtype");
    size_t elem = element_size(entry.dtype_name);
    if (elem == 0) fail(ErrorKind::kCheckpoint, what, " has unknown dtype '", entry.dtype_name, "'");
    entry.dtype = float_dtype(entry.dtype_name);

    // Checked at every factor, so no order of extents can wrap the count (2^48 * 2^16 = 0).
    int64_t numel = 1;
    for (const Json& extent : shape->array(what + " shape")) {
      int64_t n = extent.integer(what + " shape entry");
      if (n < 0) fail(ErrorKind::kCheckpoint, what, " has a negative shape entry");
      entry.shape.push_back(n);
      const std::optional<int64_t> product = checked_product({numel, n});
      if (n > kMaxElements || !product || *product > kMaxElements)
        fail(ErrorKind::kCheckpoint, what, " shape is implausibly large: more than 2^48 elements (",
             shape_str(entry.shape), " and on; the product would overflow)");
      numel = *product;
    }
    const auto& range = offsets->array(what + " data_offsets");
    if (range.size() != 2) fail(ErrorKind::kCheckpoint, what, " data_offsets must be [begin, end]");
    int64_t begin = range[0].integer(what + " data_offsets");
    int64_t end = range[1].integer(what + " data_offsets");
    if (begin < 0 || end < begin || static_cast<uint64_t>(end) > data_size_)
      fail(ErrorKind::kCheckpoint, what, " data_offsets [", begin, ", ", end, "] out of range: the file holds ",
           data_size_, " bytes of data (truncated?)");
    const int64_t nbytes = numel * static_cast<int64_t>(elem);  // <= 2^51: cannot overflow
    if (end - begin != nbytes)
      fail(ErrorKind::kCheckpoint, what, " data_offsets span ", end - begin, " bytes but dtype ", entry.dtype_name,
           " and shape ", shape_str(entry.shape), " need ", nbytes);
    // The mapping starts page-aligned, so the file offset decides the alignment of the data.
    const uint64_t file_offset = 8 + header_len + static_cast<uint64_t>(begin);
    if (nbytes > 0 && file_offset % elem != 0)
      fail(ErrorKind::kCheckpoint, what, " is misaligned: its data starts at file byte ", file_offset,
           ", not a multiple of its ", elem, "-byte element size (data_offsets or the header length are not",
           " aligned)");
    entry.offset = static_cast<size_t>(begin);
    entry.nbytes = static_cast<size_t>(end - begin);
    auto inserted = entries_.emplace(name, std::move(entry));
    if (inserted.first->second.nbytes > 0) by_offset.push_back(&inserted.first->second);
  }

  std::sort(by_offset.begin(), by_offset.end(),
            [](const SafetensorsEntry* a, const SafetensorsEntry* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const SafetensorsEntry* prev = by_offset[i - 1];
    if (prev->offset + prev->nbytes > by_offset[i]->offset)
      fail(ErrorKind::kCheckpoint, path_, ": tensors '", prev->name, "' and '", by_offset[i]->name,
           "' have overlapping data_offsets");
  }
}

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second;
}

Tensor SafetensorsFile::view(const SafetensorsEntry& entry) {
  if (!entry.dtype)
    fail(ErrorKind::kCheckpoint, path_, ": tensor '", entry.name, "' has dtype ", entry.dtype_name,
         "; weights must be F32, BF16 or F16");
  Tensor tensor = Tensor::view(const_cast<void*>(data(entry)), *entry.dtype, entry.shape);
  tensor.storage = shared_from_this();
  return tensor;
}

void SafetensorsFile::read_into(const SafetensorsEntry& entry, void* dst) const {
  auto* out = static_cast<uint8_t*>(dst);
  size_t done = 0;
  const auto file_offset = static_cast<off_t>((data_ - static_cast<const uint8_t*>(mapping_)) + entry.offset);
  while (done < entry.nbytes) {
    ssize_t got = ::pread(fd_, out + done, entry.nbytes - done, file_offset + static_cast<off_t>(done));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0)
      fail(ErrorKind::kCheckpoint, path_, ": reading tensor '", entry.name, "' failed",
           got < 0 ? std::string(": ") + std::strerror(errno) : std::string(" (file truncated while loading?)"));
    done += static_cast<size_t>(got);
  }
}

}  // namespace mc
