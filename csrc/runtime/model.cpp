#include "runtime/model.h"

#include <algorithm>
#include <set>

#include "core/checked_math.h"
#include "core/error.h"
#include "cpu/cpu_backend.h"
#include "cuda/cuda_backend.h"

namespace mc {
namespace {

constexpr int32_t kMaxBlockSize = 4096;
constexpr int32_t kDefaultStepTokens = 2048;
constexpr int32_t kDefaultStepSeqs = 256;
constexpr int32_t kMaxLogitRows = 256;

std::string resolve_device(const std::string& device) {
  if (device == "cpu") return device;
  const bool cuda_ready = cuda::compiled() && cuda::device_count() > 0;
  if (device == "auto") return cuda_ready ? "cuda" : "cpu";
  if (device == "cuda") {
    if (!cuda::compiled()) fail(ErrorKind::kUnsupported, "this build has no CUDA backend; use device='cpu'");
    if (!cuda_ready) fail(ErrorKind::kUnsupported, "no CUDA device is visible; use device='cpu'");
    return device;
  }
  fail(ErrorKind::kInvalidRequest, "unknown device '", device, "' (expected 'cpu', 'cuda' or 'auto')");
}

// The weight dtype on CUDA: bfloat16 or float16 (weights and activations).
DType cuda_dtype(std::optional<DType> dtype) {
  if (dtype && *dtype == DType::kF32)
    fail(ErrorKind::kUnsupported, "the CUDA backend computes in bfloat16 or float16, not float32");
  return dtype.value_or(DType::kBF16);
}

std::unique_ptr<Backend> make_backend(const std::string& device) {
  return device == "cpu" ? cpu::make_backend() : cuda::make_backend();
}

// Tokens [begin, begin + count) of entries[entry], run in one forward pass.
struct Chunk {
  int32_t entry;
  int64_t begin;
  int64_t count;
};

// Splits the step into forward passes within the limits: entries in order, a long one in
// chunks over consecutive passes (chunked prefill is exact: each chunk attends to the cached
// prefix), so a sequence appears at most once per pass.
std::vector<std::vector<Chunk>> plan_passes(const std::vector<StepEntry>& entries, const StepLimits& limits) {
  std::vector<std::vector<Chunk>> passes(1);
  int64_t used = 0;
  auto flush = [&] {
    if (!passes.back().empty()) passes.emplace_back();
    used = 0;
  };
  for (int32_t e = 0; e < static_cast<int32_t>(entries.size()); ++e) {
    const auto n = static_cast<int64_t>(entries[e].tokens.size());
    for (int64_t offset = 0; offset < n;) {
      if (used == limits.max_tokens || static_cast<int32_t>(passes.back().size()) == limits.max_entries) flush();
      const int64_t take = std::min(n - offset, limits.max_tokens - used);
      passes.back().push_back({e, offset, take});
      used += take;
      offset += take;
      if (offset < n) flush();
    }
  }
  if (passes.back().empty()) passes.pop_back();
  return passes;
}

}  // namespace

Model::Model(ModelConfig config, KvLayout layout, int64_t num_blocks, std::string device, DType dtype,
             std::unique_ptr<Backend> backend)
    : config_(std::move(config)),
      blocks_(layout, num_blocks),
      device_(std::move(device)),
      dtype_(dtype),
      backend_(std::move(backend)) {}

Model::~Model() = default;

int64_t Model::default_num_blocks(const ModelConfig& config, int32_t block_size, DType kv_dtype) {
  const int64_t per_sequence = config.sliding_window
                                   ? KvLayout::ring_blocks_for(*config.sliding_window, block_size)
                                   : (config.max_seq_len + block_size - 1) / block_size;
  const std::optional<int64_t> bytes_per_block = checked_product(
      {config.n_layers, 2, block_size, config.n_kv_heads, config.head_dim, static_cast<int64_t>(dtype_size(kv_dtype))});
  if (!bytes_per_block || *bytes_per_block == 0)
    fail(ErrorKind::kInvalidRequest, "a KV-cache block of this config has no valid size (validate() the config)");
  const int64_t budget_blocks = (int64_t{8} << 30) / *bytes_per_block;
  return std::max<int64_t>(per_sequence, std::min<int64_t>(4 * per_sequence, budget_blocks));
}

std::unique_ptr<Model> Model::prepare(const ModelConfig& config, const ModelOptions& options, DType dtype) {
  if (options.block_size <= 0 || options.block_size > kMaxBlockSize)
    fail(ErrorKind::kInvalidRequest, "block_size must be in 1..", kMaxBlockSize, ", got ", options.block_size);
  if (options.num_blocks < 0) fail(ErrorKind::kInvalidRequest, "num_blocks must be positive, got ", options.num_blocks);
  if (options.max_step_tokens < 0 || options.max_step_seqs < 0)
    fail(ErrorKind::kInvalidRequest, "max_step_tokens and max_step_seqs must be positive (0 = default)");
  std::string device = resolve_device(options.device);
  std::unique_ptr<Backend> backend = make_backend(device);
  const DType kv_dtype = backend->activation_dtype(dtype);
  KvLayout layout = KvLayout::make(options.block_size, config.sliding_window.value_or(0));
  const int64_t num_blocks =
      options.num_blocks > 0 ? options.num_blocks : default_num_blocks(config, options.block_size, kv_dtype);
  return std::unique_ptr<Model>(new Model(config, layout, num_blocks, device, dtype, std::move(backend)));
}

void Model::start(ModelWeights weights, const ModelOptions& options) {
  StepLimits limits;
  limits.max_tokens = options.max_step_tokens > 0 ? options.max_step_tokens : kDefaultStepTokens;
  limits.max_entries = std::min(options.max_step_seqs > 0 ? options.max_step_seqs : kDefaultStepSeqs, limits.max_tokens);
  limits.max_logit_rows = std::min(kMaxLogitRows, limits.max_tokens);
  limits.max_context = config_.sliding_window ? *config_.sliding_window : config_.max_seq_len;
  forward_ = std::make_unique<ForwardPass>(*backend_, config_, std::move(weights), blocks_.layout(),
                                           blocks_.num_blocks(), limits);
}

std::unique_ptr<Model> Model::load(const std::string& model_dir, const ModelOptions& options) {
  // Device and options are checked before the (possibly long) weight load.
  const std::string device = resolve_device(options.device);
  if (device == "cuda") cuda_dtype(options.dtype);
  LoadOptions load;
  load.use_mmap = options.use_mmap;
  if (device == "cpu") {
    load.dtype = options.dtype;  // the CPU converts while it reads; CUDA converts on the device
    load.progress = options.progress;
  }
  load.quantize = options.quantization;
  load.quantize_activations = options.quantize_activations;
  Checkpoint checkpoint = load_checkpoint(model_dir, load);
  const DType dtype = device == "cpu" ? checkpoint.weights.float_dtype() : cuda_dtype(options.dtype);
  std::unique_ptr<Model> model = prepare(checkpoint.config, options, dtype);
  ModelWeights weights = model->backend_->place_weights(
      checkpoint.config, std::move(checkpoint.weights), device == "cpu" ? std::nullopt : std::optional<DType>(dtype),
      device == "cpu" ? ProgressFn() : options.progress);
  model->quantization_ = weights.quantization;
  model->start(std::move(weights), options);
  return model;
}

std::unique_ptr<Model> Model::from_config(const ModelConfig& config, uint64_t seed, const ModelOptions& options) {
  config.validate();
  const std::string device = resolve_device(options.device);
  const DType dtype = device == "cpu" ? options.dtype.value_or(DType::kF32) : cuda_dtype(options.dtype);
  if (options.quantization && device != "cpu")
    fail(ErrorKind::kUnsupported, "random weights are quantized on the host: use device='cpu', or load a checkpoint "
         "with quantization= on CUDA");
  std::unique_ptr<Model> model = prepare(config, options, dtype);
  ModelWeights weights = model->backend_->random_weights(config, seed, dtype, options.progress);
  if (options.quantization) quantize_layers(weights, *options.quantization, kDefaultInt4GroupSize);
  set_quantize_activations(weights, options.quantize_activations);
  model->quantization_ = weights.quantization;
  model->start(std::move(weights), options);
  return model;
}

int32_t Model::add_sequence() {
  std::lock_guard<std::mutex> lock(mutex_);
  return blocks_.add_sequence();
}

int32_t Model::fork_sequence(int32_t seq) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::pair<int32_t, int32_t>> copies;
  const int32_t fork = blocks_.fork_sequence(seq, &copies);
  forward_->copy_blocks(copies);
  return fork;
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

void Model::resize_kv_cache(int64_t num_blocks) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (blocks_.num_sequences() != 0)
    fail(ErrorKind::kInvalidRequest, "the KV cache can be resized only while no sequence is alive (",
         blocks_.num_sequences(), " are)");
  if (num_blocks < 0) fail(ErrorKind::kInvalidRequest, "num_blocks must be positive (0 = default), got ", num_blocks);
  const KvLayout layout = blocks_.layout();
  if (num_blocks == 0) num_blocks = default_num_blocks(config_, layout.block_size, forward_->activation_dtype());
  BlockManager blocks(layout, num_blocks);  // checks the count before any memory is taken
  forward_->resize_kv_pools(num_blocks);
  blocks_ = std::move(blocks);
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
  run_step(entries, all_logits, logits, nullptr, nullptr);
}

void Model::step_and_sample(const std::vector<StepEntry>& entries, const std::vector<const EntrySampling*>& sampling,
                            std::vector<SampledToken>* sampled) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (sampling.size() != entries.size())
    fail(ErrorKind::kInvalidRequest, "step_and_sample: ", sampling.size(), " sampling entries for ", entries.size(),
         " step entries");
  for (const EntrySampling* s : sampling)
    if (s != nullptr) {
      for (const auto* list : {s->history_ids, s->banned})
        for (int32_t id : *list)
          if (id < 0 || id >= config_.vocab_size) fail(ErrorKind::kInvalidRequest, "sampling: token id ", id, " out of range");
      for (const auto& [id, bias] : *s->logit_bias)
        if (id < 0 || id >= config_.vocab_size) fail(ErrorKind::kInvalidRequest, "logit_bias: token id ", id, " out of range");
    }
  sampled->assign(entries.size(), SampledToken());
  run_step(entries, false, nullptr, &sampling, sampled);
}

int64_t Model::blocks_needed(int32_t seq, int64_t n) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const KvLayout& layout = blocks_.layout();
  const int64_t start = seq < 0 ? 0 : blocks_.length(seq), end = start + n;
  if (seq >= 0) return blocks_.blocks_needed(seq, {{layout.first_kept(start, end), end}});
  // A new sequence: every block its range touches (distinct ring entries under a window).
  std::set<int64_t> touched;
  for (int64_t block = layout.logical_block(layout.first_kept(start, end)); n > 0 && block <= layout.logical_block(end - 1);
       ++block)
    touched.insert(layout.table_index(block * layout.block_size));
  return static_cast<int64_t>(touched.size());
}

void Model::run_step(const std::vector<StepEntry>& entries, bool all_logits, float* logits,
                     const std::vector<const EntrySampling*>* sampling, std::vector<SampledToken>* sampled) {
  validate(entries);
  const KvLayout& layout = blocks_.layout();
  const std::vector<std::vector<Chunk>> passes = plan_passes(entries, forward_->limits());

  // The blocks every pass will allocate, checked before any of them runs.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> ranges(entries.size());
  for (const auto& pass : passes)
    for (const Chunk& chunk : pass) {
      const int64_t start = blocks_.length(entries[chunk.entry].seq) + chunk.begin, end = start + chunk.count;
      ranges[chunk.entry].emplace_back(layout.first_kept(start, end), end);
    }
  int64_t needed = 0;
  for (size_t e = 0; e < entries.size(); ++e) needed += blocks_.blocks_needed(entries[e].seq, ranges[e]);
  if (needed > blocks_.free_blocks())
    fail(ErrorKind::kCacheFull, "KV cache is full: this step needs ", needed, " more blocks but only ",
         blocks_.free_blocks(), " of ", blocks_.num_blocks(),
         " are free (free finished sequences or load with a larger num_blocks)");

  // Row of the caller's logits where each entry's rows start (sampling: the entry index).
  std::vector<int64_t> first_row(entries.size());
  for (size_t e = 0, row = 0; e < entries.size(); ++e) {
    first_row[e] = sampling ? static_cast<int64_t>(e) : static_cast<int64_t>(row);
    row += all_logits ? entries[e].tokens.size() : 1;
  }

  for (std::vector<Chunk> pass : passes) {
    // Decode entries (one token) first: they take the decode attention kernel.
    std::stable_partition(pass.begin(), pass.end(), [](const Chunk& c) { return c.count == 1; });
    StepBatch batch;
    PassSampling pass_sampling;
    batch.cu_seqlens.push_back(0);
    for (const Chunk& chunk : pass) {
      const StepEntry& entry = entries[chunk.entry];
      const int64_t start = blocks_.length(entry.seq), end = start + chunk.count;
      blocks_.allocate(entry.seq, layout.first_kept(start, end), end);
      if (chunk.count == 1) ++batch.n_decode;
      batch.start_pos.push_back(start);
      const auto row0 = static_cast<int32_t>(batch.tokens.size());
      for (int64_t i = 0; i < chunk.count; ++i) {
        batch.positions.push_back(start + i);
        batch.tokens.push_back(static_cast<int32_t>(entry.tokens[chunk.begin + i]));
      }
      batch.cu_seqlens.push_back(static_cast<int32_t>(batch.tokens.size()));
      batch.max_blocks = std::max(batch.max_blocks, static_cast<int32_t>(blocks_.table(entry.seq).size()));
      if (all_logits) {
        for (int64_t i = 0; i < chunk.count; ++i) {
          batch.logit_rows.push_back(row0 + static_cast<int32_t>(i));
          batch.logit_dest.push_back(first_row[chunk.entry] + chunk.begin + i);
        }
      } else if (chunk.begin + chunk.count == static_cast<int64_t>(entry.tokens.size())) {
        const EntrySampling* s = sampling ? (*sampling)[chunk.entry] : nullptr;
        if (sampling && s == nullptr) continue;  // a prompt chunk: no row wanted
        batch.logit_rows.push_back(batch.cu_seqlens.back() - 1);
        batch.logit_dest.push_back(first_row[chunk.entry]);
        if (s == nullptr) continue;
        PassSampling& ps = pass_sampling;
        ps.controls.push_back(s->controls);
        ps.history_ids.insert(ps.history_ids.end(), s->history_ids->begin(), s->history_ids->end());
        ps.output_counts.insert(ps.output_counts.end(), s->output_counts->begin(), s->output_counts->end());
        ps.history_offsets.push_back(static_cast<int32_t>(ps.history_ids.size()));
        for (const auto& [id, bias] : *s->logit_bias) {
          ps.bias_ids.push_back(id);
          ps.bias_values.push_back(bias);
        }
        ps.bias_offsets.push_back(static_cast<int32_t>(ps.bias_ids.size()));
        ps.banned_ids.insert(ps.banned_ids.end(), s->banned->begin(), s->banned->end());
        ps.banned_offsets.push_back(static_cast<int32_t>(ps.banned_ids.size()));
      }
    }
    batch.block_tables.assign(static_cast<size_t>(batch.n_entries()) * batch.max_blocks, -1);
    for (int32_t e = 0; e < batch.n_entries(); ++e) {
      const auto& table = blocks_.table(entries[pass[e].entry].seq);
      std::copy(table.begin(), table.end(), batch.block_tables.begin() + static_cast<int64_t>(e) * batch.max_blocks);
    }
    forward_->run(batch, logits, sampling ? &pass_sampling : nullptr, sampled);
    for (const Chunk& chunk : pass) {
      const int32_t seq = entries[chunk.entry].seq;
      blocks_.set_length(seq, blocks_.length(seq) + chunk.count);
    }
  }
}

}  // namespace mc
