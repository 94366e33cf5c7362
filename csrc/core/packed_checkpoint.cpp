#include "core/packed_checkpoint.h"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <numeric>

#include "core/error.h"

namespace mc {
namespace {

// Nibble of an AWQ word that holds column j of its eight (the inverse of {0,2,4,6,1,3,5,7}).
constexpr int kAwqNibbleOfColumn[8] = {0, 4, 1, 5, 2, 6, 3, 7};

std::string lowercase(std::string text) {
  for (char& c : text) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return text;
}

// A 2-D tensor of `dtype` (one of `dtypes`) with shape `shape`, or a kCheckpoint error.
RawTensor require(const RawTensorReader& read, const std::string& name, const std::vector<std::string>& dtypes,
                  const std::vector<int64_t>& shape) {
  std::optional<RawTensor> tensor = read(name);
  if (!tensor) fail(ErrorKind::kCheckpoint, "missing tensor '", name, "' of the quantized checkpoint");
  if (std::find(dtypes.begin(), dtypes.end(), tensor->dtype) == dtypes.end())
    fail(ErrorKind::kCheckpoint, "tensor '", name, "' has dtype ", tensor->dtype, "; expected ", dtypes[0]);
  if (tensor->shape != shape)
    fail(ErrorKind::kCheckpoint, "tensor '", name, "' has shape ", shape_str(tensor->shape), " but the config implies ",
         shape_str(shape));
  return std::move(*tensor);
}

float scale_at(const RawTensor& scales, size_t i) {
  if (scales.dtype == "F32") return load_float(scales.bytes.data(), DType::kF32, i);
  return load_float(scales.bytes.data(), scales.dtype == "BF16" ? DType::kBF16 : DType::kF16, i);
}

uint32_t word_at(const RawTensor& packed, size_t i) {
  uint32_t word;
  std::memcpy(&word, packed.bytes.data() + i * 4, 4);
  return word;
}

// The group of each input row, from g_idx (or row / G without one), checked: every index in
// range and every group exactly G rows, so sorting rows by group makes groups contiguous.
std::vector<int32_t> group_of_rows(const RawTensorReader& read, const std::string& name, int64_t K, int32_t G) {
  const int64_t groups = K / G;
  std::vector<int32_t> group(static_cast<size_t>(K));
  std::optional<RawTensor> g_idx = read(name);
  if (!g_idx) {
    for (int64_t k = 0; k < K; ++k) group[k] = static_cast<int32_t>(k / G);
    return group;
  }
  if (g_idx->dtype != "I32" && g_idx->dtype != "I64")
    fail(ErrorKind::kCheckpoint, "tensor '", name, "' has dtype ", g_idx->dtype, "; expected I32");
  if (g_idx->shape != std::vector<int64_t>{K})
    fail(ErrorKind::kCheckpoint, "tensor '", name, "' has shape ", shape_str(g_idx->shape), " but the config implies [",
         K, "]");
  std::vector<int64_t> members(static_cast<size_t>(groups), 0);
  for (int64_t k = 0; k < K; ++k) {
    int64_t value;
    if (g_idx->dtype == "I32") {
      int32_t narrow;
      std::memcpy(&narrow, g_idx->bytes.data() + k * 4, 4);
      value = narrow;
    } else {
      std::memcpy(&value, g_idx->bytes.data() + k * 8, 8);
    }
    if (value < 0 || value >= groups)
      fail(ErrorKind::kCheckpoint, "tensor '", name, "' maps input row ", k, " to group ", value, ", outside [0, ",
           groups, ")");
    group[k] = static_cast<int32_t>(value);
    ++members[value];
  }
  for (int64_t g = 0; g < groups; ++g)
    if (members[g] != G)
      fail(ErrorKind::kCheckpoint, "tensor '", name, "' gives group ", g, " ", members[g], " input rows; group_size is ",
           G);
  return group;
}

}  // namespace

std::optional<PackedQuantization> packed_quantization(const Json& config, const std::string& source) {
  const Json* q = config.find("quantization_config");
  if (q == nullptr || q->is_null()) return std::nullopt;
  const std::string what = source + " quantization_config";
  q->object(what);
  const Json* method = q->find("quant_method");
  if (method == nullptr) fail(ErrorKind::kCheckpoint, what, " has no quant_method");
  const std::string name = lowercase(method->string(what + " quant_method"));
  PackedQuantization format;
  if (name == "awq") {
    format.method = PackedQuantization::Method::kAwq;
  } else if (name == "gptq") {
    format.method = PackedQuantization::Method::kGptq;
  } else {
    fail(ErrorKind::kCheckpoint, what, ": quant_method '", name, "' is not supported (awq and gptq 4-bit are)");
  }
  const Json* bits = q->find(format.method == PackedQuantization::Method::kAwq && !q->find("bits") ? "w_bit" : "bits");
  if (bits == nullptr) fail(ErrorKind::kCheckpoint, what, " has no bits");
  if (bits->integer(what + " bits") != 4)
    fail(ErrorKind::kCheckpoint, what, ": ", name, " with ", bits->integer(what + " bits"),
         " bits is not supported (4 bits only)");
  const Json* group = q->find(q->find("group_size") ? "group_size" : "q_group_size");
  if (group != nullptr) format.group_size = static_cast<int32_t>(group->integer(what + " group_size"));
  if (format.group_size == 0 || format.group_size < -1)
    fail(ErrorKind::kCheckpoint, what, ": group_size ", format.group_size, " is not valid");
  if (format.method == PackedQuantization::Method::kAwq) {
    if (const Json* version = q->find("version"); version && lowercase(version->string(what + " version")) != "gemm")
      fail(ErrorKind::kCheckpoint, what, ": AWQ version '", version->string(what + " version"),
           "' is not supported (GEMM packing only)");
    if (const Json* zero_point = q->find("zero_point"); zero_point && !zero_point->boolean(what + " zero_point"))
      fail(ErrorKind::kCheckpoint, what, ": AWQ without zero points (zero_point false) is not supported");
  } else {
    if (const Json* fmt = q->find("checkpoint_format")) {
      const std::string value = lowercase(fmt->string(what + " checkpoint_format"));
      if (value == "gptq_v2") {
        format.zeros_minus_one = false;
      } else if (value != "gptq") {
        fail(ErrorKind::kCheckpoint, what, ": GPTQ checkpoint_format '", value, "' is not supported");
      }
    }
    if (const Json* lm_head = q->find("lm_head"); lm_head && lm_head->boolean(what + " lm_head"))
      fail(ErrorKind::kCheckpoint, what, ": a quantized lm_head is not supported");
  }
  return format;
}

void read_packed_piece(const PackedQuantization& format, const RawTensorReader& read, const PackedPiece& piece) {
  const int64_t N = piece.rows, K = piece.cols;
  const int32_t G = format.group_size == -1 ? static_cast<int32_t>(K) : format.group_size;
  const std::string& m = piece.module;
  if (K % 32 != 0 || G % 32 != 0 || K % G != 0 || N % 8 != 0)
    fail(ErrorKind::kCheckpoint, m, ": a ", N, " x ", K, " matrix in groups of ", G,
         " is not supported (needs in % 32 == 0, group_size % 32 == 0, in % group_size == 0, out % 8 == 0)");
  const int64_t groups = K / G;
  const bool gptq = format.method == PackedQuantization::Method::kGptq;
  QuantizedMatrix& target = *piece.target;
  if (!target.defined()) {
    target = QuantizedMatrix::allocate(WeightFormat::kInt4, piece.target_count, piece.target_rows, K, G, gptq);
    if (gptq) std::fill_n(static_cast<int32_t*>(target.col_perm.get()), piece.target_count * K, -1);
  }
  if (target.cols != K || target.group_size != G)
    fail(ErrorKind::kCheckpoint, m, ": its shape or group size differs from the other parts of its fused matrix");

  RawTensor qweight, qzeros, scales;
  std::vector<int32_t> group;
  if (gptq) {
    qweight = require(read, m + ".qweight", {"I32"}, {K / 8, N});
    qzeros = require(read, m + ".qzeros", {"I32"}, {groups, N / 8});
    scales = require(read, m + ".scales", {"F16", "BF16", "F32"}, {groups, N});
    group = group_of_rows(read, m + ".g_idx", K, G);
  } else {
    qweight = require(read, m + ".qweight", {"I32"}, {K, N / 8});
    qzeros = require(read, m + ".qzeros", {"I32"}, {groups, N / 8});
    scales = require(read, m + ".scales", {"F16", "BF16", "F32"}, {groups, N});
    group = group_of_rows([](const std::string&) { return std::nullopt; }, "", K, G);
  }
  // Stored column c of the target holds input row order[c]: input rows sorted by group.
  std::vector<int32_t> order(static_cast<size_t>(K));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return group[a] < group[b]; });
  if (gptq) {
    int32_t* perm = static_cast<int32_t*>(target.col_perm.get()) + piece.index * K;
    if (perm[0] == -1) {
      std::copy(order.begin(), order.end(), perm);
    } else if (!std::equal(order.begin(), order.end(), perm)) {
      fail(ErrorKind::kCheckpoint, m, ": its g_idx orders the input differently from the other parts of its fused",
           " matrix (q/k/v or gate/up), which this engine computes as one");
    }
  }

  auto q_at = [&](int64_t k, int64_t n) -> uint8_t {
    if (gptq) return (word_at(qweight, static_cast<size_t>((k / 8) * N + n)) >> (4 * (k % 8))) & 0xF;
    return (word_at(qweight, static_cast<size_t>(k * (N / 8) + n / 8)) >> (4 * kAwqNibbleOfColumn[n % 8])) & 0xF;
  };
  auto z_at = [&](int64_t g, int64_t n) -> float {
    const size_t word = static_cast<size_t>(g * (N / 8) + n / 8);
    const int nibble = gptq ? static_cast<int>(n % 8) : kAwqNibbleOfColumn[n % 8];
    const uint32_t z = (word_at(qzeros, word) >> (4 * nibble)) & 0xF;
    return static_cast<float>(z) + (gptq && format.zeros_minus_one ? 1.0f : 0.0f);
  };
  const WeightRef ref = target.ref();
  const int64_t first_row = piece.index * piece.target_rows + piece.row0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t r = first_row + n;
    auto* row = static_cast<uint8_t*>(target.data.get()) + r * ref.row_bytes();
    for (int64_t c = 0; c < K; ++c) set_int4(row, c, q_at(order[c], n));
    float* s = static_cast<float*>(target.scales.get()) + r * groups;
    float* z = static_cast<float*>(target.zeros.get()) + r * groups;
    for (int64_t g = 0; g < groups; ++g) {
      s[g] = scale_at(scales, static_cast<size_t>(g * N + n));
      z[g] = z_at(g, n);
    }
  }
}

void drop_identity_col_perm(QuantizedMatrix& target) {
  if (!target.col_perm) return;
  const auto* perm = static_cast<const int32_t*>(target.col_perm.get());
  for (int64_t i = 0; i < target.count * target.cols; ++i)
    if (perm[i] != i % target.cols) return;
  target.col_perm.reset();
}

}  // namespace mc
