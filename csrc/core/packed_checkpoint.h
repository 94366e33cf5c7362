// 4-bit checkpoints already quantized by AWQ or GPTQ (config.json's quantization_config), read
// into the int4 format of core/weight.h exactly: the same q, z and s, so w = (q - z) · s is
// unchanged. Both store the transpose of a PyTorch Linear weight [N = out, K = in]:
//   AWQ (GEMM):  qweight int32 [K, N/8], eight 4-bit values per int32 along N in the interleaved
//                order: nibble i holds column 8j + kAwqOrder[i], kAwqOrder = {0,2,4,6,1,3,5,7};
//                qzeros int32 [K/G, N/8] packed the same way; scales f16 [K/G, N].
//   GPTQ:        qweight int32 [K/8, N], nibble i of word (k/8, n) holds row k = 8(k/8) + i;
//                qzeros int32 [groups, N/8], nibble i of word (g, n/8) holds column 8(n/8) + i,
//                storing z - 1 (checkpoint_format "gptq"; "gptq_v2" stores z); scales f16
//                [groups, N]; g_idx int32 [K]: the group of each input row (act-order permutes it).
// An act-order matrix is regrouped: its columns are stored sorted by group (stable), with
// WeightRef::col_perm naming each stored column's input column, so groups are contiguous again.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "core/json.h"
#include "core/quantized.h"

namespace mc {

struct PackedQuantization {
  enum class Method { kAwq, kGptq };
  Method method = Method::kAwq;
  int32_t group_size = 128;  // -1: one group over the whole input
  bool zeros_minus_one = true;  // GPTQ checkpoint_format "gptq" (v1)
  const char* name() const { return method == Method::kAwq ? "awq" : "gptq"; }
};

// The packed format of a config.json, nullopt without a quantization_config. Anything but 4-bit
// AWQ (GEMM) or GPTQ is refused with a kCheckpoint error naming it; other keys are ignored.
std::optional<PackedQuantization> packed_quantization(const Json& config, const std::string& source);

// A checkpoint tensor as stored: safetensors dtype name, shape, raw bytes.
struct RawTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};
// Reads a tensor by name; nullopt when the checkpoint has none of that name.
using RawTensorReader = std::function<std::optional<RawTensor>(const std::string& name)>;

// Where one checkpoint matrix [rows, cols] goes: rows [row0, row0 + rows) of matrix `index` of
// the stack `target` (allocated on first use with `target_count` matrices of `target_rows` rows).
struct PackedPiece {
  std::string module;  // checkpoint name without ".weight", e.g. "model.layers.0.self_attn.q_proj"
  int64_t rows = 0, cols = 0;
  QuantizedMatrix* target = nullptr;
  int64_t target_count = 1, target_rows = 0;
  int64_t index = 0, row0 = 0;
};

// Decodes one module's packed tensors into its piece of the target; kCheckpoint errors name the
// tensor and the problem (missing, dtype, shape, g_idx out of range or unequal groups, act-order
// orders that differ between the pieces of one fused matrix).
void read_packed_piece(const PackedQuantization& format, const RawTensorReader& read, const PackedPiece& piece);

// Drops the column orders of targets whose every matrix kept its natural order.
void drop_identity_col_perm(QuantizedMatrix& target);

}  // namespace mc
