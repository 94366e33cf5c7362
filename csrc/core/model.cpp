#include "core/model.h"

#include <algorithm>
#include <set>

#include "core/checked_math.h"
#include "core/device.h"
#include "core/error.h"
#include "cpu/cpu_backend.h"

namespace mc {
namespace {

constexpr int32_t kMaxBlockSize = 4096;

std::string resolve_device(const std::string& device) {
  if (device == "cpu") return device;
  const bool cuda_ready = cuda_compiled() && cuda_device_count() > 0;
  if (device == "auto") return cuda_ready ? "cuda" : "cpu";
  if (device == "cuda") {
    if (!cuda_compiled()) fail(ErrorKind::kUnsupported, "this build has no CUDA backend; use device='cpu'");
    if (!cuda_ready) fail(ErrorKind::kUnsupported, "no CUDA device is visible; use device='cpu'");
    return device;
  }
  fail(ErrorKind::kInvalidRequest, "unknown device '", device, "' (expected 'cpu', 'cuda' or 'auto')");
}

DType resolve_dtype(const std::string& device, std::optional<DType> dtype) {
  if (device == "cpu") {
    if (dtype && *dtype != DType::kF32)
      fail(ErrorKind::kUnsupported, "the CPU backend computes in float32; dtype ", dtype_name(*dtype),
           " is for device='cuda'");
    return DType::kF32;
  }
  if (dtype && *dtype == DType::kF32)
    fail(ErrorKind::kUnsupported, "the CUDA backend computes in bfloat16 or float16, not float32");
  return dtype.value_or(DType::kBF16);
}

}  // namespace

Model::Model(ModelConfig config, KvLayout layout, int64_t num_blocks, std::string device, DType dtype)
    : config_(std::move(config)), blocks_(layout, num_blocks), device_(std::move(device)), dtype_(dtype) {}

int64_t Model::default_num_blocks(const ModelConfig& config, int32_t block_size, DType dtype) {
  const int64_t per_sequence = config.sliding_window
                                   ? KvLayout::ring_blocks_for(*config.sliding_window, block_size)
                                   : (config.max_seq_len + block_size - 1) / block_size;
  const std::optional<int64_t> bytes_per_block = checked_product(
      {config.n_layers, 2, block_size, config.n_kv_heads, config.head_dim, static_cast<int64_t>(dtype_size(dtype))});
  if (!bytes_per_block || *bytes_per_block == 0)
    fail(ErrorKind::kInvalidRequest, "a KV-cache block of this config has no valid size (validate() the config)");
  const int64_t budget_blocks = (int64_t{8} << 30) / *bytes_per_block;
  return std::max<int64_t>(per_sequence, std::min<int64_t>(4 * per_sequence, budget_blocks));
}

std::unique_ptr<Model> Model::prepare(const ModelConfig& config, const ModelOptions& options) {
  if (options.block_size <= 0 || options.block_size > kMaxBlockSize)
    fail(ErrorKind::kInvalidRequest, "block_size must be in 1..", kMaxBlockSize, ", got ", options.block_size);
  if (options.num_blocks < 0) fail(ErrorKind::kInvalidRequest, "num_blocks must be positive, got ", options.num_blocks);
  std::string device = resolve_device(options.device);
  DType dtype = resolve_dtype(device, options.dtype);
  KvLayout layout = KvLayout::make(options.block_size, config.sliding_window.value_or(0));
  const int64_t num_blocks =
      options.num_blocks > 0 ? options.num_blocks : default_num_blocks(config, options.block_size, dtype);
  return std::unique_ptr<Model>(new Model(config, layout, num_blocks, device, dtype));
}

BackendInit Model::backend_init(const ModelOptions& options) const {
  BackendInit init;
  init.config = config_;
  init.layout = blocks_.layout();
  init.num_blocks = blocks_.num_blocks();
  init.dtype = dtype_;
  init.progress = options.progress;
  return init;
}

std::unique_ptr<Model> Model::load(const std::string& model_dir, const ModelOptions& options) {
  // Device and options are checked before the (possibly long) weight load.
  std::string device = resolve_device(options.device);
  resolve_dtype(device, options.dtype);
  Checkpoint checkpoint = load_checkpoint(model_dir, device == "cpu" ? std::optional<DType>(DType::kF32) : std::nullopt,
                                          device == "cpu" ? options.progress : ProgressFn(), options.use_mmap);
  std::unique_ptr<Model> model = prepare(checkpoint.config, options);
  if (model->device_ == "cpu") {
    model->backend_ = std::make_unique<cpu::CpuBackend>(checkpoint.config, std::move(checkpoint.weights),
                                                        model->blocks_.layout(), model->blocks_.num_blocks());
  } else {
    model->backend_ = make_cuda_backend(model->backend_init(options), checkpoint.weights);
  }
  return model;
}

std::unique_ptr<Model> Model::from_config(const ModelConfig& config, uint64_t seed, const ModelOptions& options) {
  config.validate();
  std::unique_ptr<Model> model = prepare(config, options);
  if (model->device_ == "cpu") {
    model->backend_ = std::make_unique<cpu::CpuBackend>(config, random_weights(config, seed), model->blocks_.layout(),
                                                        model->blocks_.num_blocks());
  } else {
    model->backend_ = make_random_cuda_backend(model->backend_init(options), seed);
  }
  return model;
}

int32_t Model::add_sequence() {
  std::lock_guard<std::mutex> lock(mutex_);
  return blocks_.add_sequence();
}

void Model::free_sequence(int32_t seq) {
  std::lock_guard<std::mutex> lock(mutex_);
  blocks_.free_sequence(seq);
}

int64_t Model::blocks_in_use(int32_t seq) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return blocks_.blocks_in_use(seq);
}

int64_t Model::sequence_length(int32_t seq) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return blocks_.length(seq);
}

int64_t Model::free_blocks() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return blocks_.free_blocks();
}

int64_t Model::logit_rows(const std::vector<StepEntry>& entries, bool all_logits) {
  if (!all_logits) return static_cast<int64_t>(entries.size());
  int64_t rows = 0;
  for (const StepEntry& entry : entries) rows += static_cast<int64_t>(entry.tokens.size());
  return rows;
}

void Model::validate(const std::vector<StepEntry>& entries) const {
  if (entries.empty()) fail(ErrorKind::kInvalidRequest, "step needs at least one (sequence, tokens) entry");
  std::set<int32_t> seen;
  for (const StepEntry& entry : entries) {
    blocks_.require_sequence(entry.seq);
    if (!seen.insert(entry.seq).second)
      fail(ErrorKind::kInvalidRequest, "sequence ", entry.seq, " appears more than once in one step");
    if (entry.tokens.empty()) fail(ErrorKind::kInvalidRequest, "empty token list for sequence ", entry.seq);
    for (size_t i = 0; i < entry.tokens.size(); ++i) {
      const int64_t token = entry.tokens[i];
      if (token < 0 || token >= config_.vocab_size)
        fail(ErrorKind::kInvalidRequest, "token id ", token, " at index ", i, " for sequence ", entry.seq,
             " is out of range [0, ", config_.vocab_size, ") (vocab_size ", config_.vocab_size, ")");
    }
    const int64_t end = blocks_.length(entry.seq) + static_cast<int64_t>(entry.tokens.size());
    if (!config_.sliding_window && end > config_.max_seq_len)
      fail(ErrorKind::kInvalidRequest, "sequence ", entry.seq, " would reach position ", end - 1,
           ", past max_seq_len ", config_.max_seq_len, " of this full-attention model");
  }
}

void Model::step(const std::vector<StepEntry>& entries, bool all_logits, float* logits) {
  std::lock_guard<std::mutex> lock(mutex_);
  validate(entries);
  const KvLayout& layout = blocks_.layout();

  int64_t needed = 0;
  for (const StepEntry& entry : entries) {
    const int64_t start = blocks_.length(entry.seq), end = start + static_cast<int64_t>(entry.tokens.size());
    needed += blocks_.blocks_needed(entry.seq, layout.first_kept(start, end), end);
  }
  if (needed > blocks_.free_blocks())
    fail(ErrorKind::kCacheFull, "KV cache is full: this step needs ", needed, " more blocks but only ",
         blocks_.free_blocks(), " of ", blocks_.num_blocks(),
         " are free (free finished sequences or load with a larger num_blocks)");

  StepBatch batch;
  batch.cu_seqlens.push_back(0);
  for (const StepEntry& entry : entries) {
    const int64_t start = blocks_.length(entry.seq), end = start + static_cast<int64_t>(entry.tokens.size());
    blocks_.allocate(entry.seq, layout.first_kept(start, end), end);
    batch.start_pos.push_back(start);
    for (int64_t pos = start; pos < end; ++pos) batch.positions.push_back(pos);
    for (int64_t token : entry.tokens) batch.tokens.push_back(static_cast<int32_t>(token));
    batch.cu_seqlens.push_back(static_cast<int32_t>(batch.tokens.size()));
    batch.max_blocks = std::max(batch.max_blocks, static_cast<int32_t>(blocks_.table(entry.seq).size()));
    if (all_logits) {
      for (int32_t row = batch.cu_seqlens[batch.cu_seqlens.size() - 2]; row < batch.cu_seqlens.back(); ++row)
        batch.logit_rows.push_back(row);
    } else {
      batch.logit_rows.push_back(batch.cu_seqlens.back() - 1);
    }
  }
  batch.max_blocks = std::max(batch.max_blocks, 1);
  batch.block_tables.assign(static_cast<size_t>(batch.n_entries()) * batch.max_blocks, -1);
  for (int32_t e = 0; e < batch.n_entries(); ++e) {
    const auto& table = blocks_.table(entries[e].seq);
    std::copy(table.begin(), table.end(), batch.block_tables.begin() + static_cast<int64_t>(e) * batch.max_blocks);
  }

  backend_->forward(batch, logits);
  for (const StepEntry& entry : entries)
    blocks_.set_length(entry.seq, blocks_.length(entry.seq) + static_cast<int64_t>(entry.tokens.size()));
}

}  // namespace mc
