#include "runtime/scheduler.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace mc {

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone: return "";
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kAbort: return "abort";
  }
  return "";
}

namespace {

void check_controls(const SamplingControls& c) {
  if (!(c.temperature >= 0.0f) || !std::isfinite(c.temperature))
    fail(ErrorKind::kInvalidRequest, "temperature must be a finite number >= 0, got ", c.temperature);
  if (c.top_k < -1) fail(ErrorKind::kInvalidRequest, "top_k must be >= -1 (0 or -1 disable it), got ", c.top_k);
  if (!(c.top_p > 0.0f && c.top_p <= 1.0f)) fail(ErrorKind::kInvalidRequest, "top_p must be in (0, 1], got ", c.top_p);
  if (!(c.min_p >= 0.0f && c.min_p <= 1.0f)) fail(ErrorKind::kInvalidRequest, "min_p must be in [0, 1], got ", c.min_p);
  if (!(c.repetition_penalty > 0.0f) || !std::isfinite(c.repetition_penalty))
    fail(ErrorKind::kInvalidRequest, "repetition_penalty must be a finite number > 0, got ", c.repetition_penalty);
  if (!std::isfinite(c.presence_penalty) || !std::isfinite(c.frequency_penalty))
    fail(ErrorKind::kInvalidRequest, "presence_penalty and frequency_penalty must be finite");
  if (c.n_logprobs > ForwardPass::kMaxLogprobs)
    fail(ErrorKind::kInvalidRequest, "logprobs must be at most ", ForwardPass::kMaxLogprobs, ", got ", c.n_logprobs);
}

}  // namespace

Scheduler::Scheduler(Model& model, const SchedulerOptions& options) : model_(model), options_(options) {
  if (options.max_num_seqs < 1 || options.max_num_batched_tokens < 1)
    fail(ErrorKind::kInvalidRequest, "max_num_seqs and max_num_batched_tokens must be >= 1");
  const StepLimits& limits = model.step_limits();
  if (options.max_num_batched_tokens > limits.max_tokens || options.max_num_seqs > limits.max_entries)
    fail(ErrorKind::kInvalidRequest, "max_num_batched_tokens ", options.max_num_batched_tokens, " / max_num_seqs ",
         options.max_num_seqs, " exceed the model's pass limits (", limits.max_tokens, " tokens, ", limits.max_entries,
         " sequences): load it with max_step_tokens / max_step_seqs at least as large");
}

Scheduler::~Scheduler() {
  for (auto& [id, request] : requests_)
    if (request->seq >= 0) model_.free_sequence(request->seq);
}

int64_t Scheduler::blocks_to_fit_alone(int64_t prompt_tokens, int32_t max_tokens) const {
  const ModelConfig& config = model_.config();
  int64_t length = prompt_tokens + max_tokens;
  if (!config.sliding_window) length = std::min(length, config.max_seq_len);
  const int64_t B = model_.block_size();
  const int64_t blocks = (length + B - 1) / B;
  return config.sliding_window ? std::min<int64_t>(blocks, KvLayout::ring_blocks_for(*config.sliding_window, B))
                               : blocks;
}

uint64_t Scheduler::add(std::vector<int32_t> prompt, const RequestParams& params) {
  Request* r = make_request(std::move(prompt), params);
  waiting_.push_back(r);
  return r->id;
}

std::vector<uint64_t> Scheduler::add_group(const std::vector<int32_t>& prompt, const std::vector<RequestParams>& params) {
  if (params.empty()) fail(ErrorKind::kInvalidRequest, "add_group needs at least one sample");
  std::vector<Request*> group;
  try {
    for (const RequestParams& p : params) group.push_back(make_request(prompt, p));
  } catch (...) {
    for (Request* r : group) requests_.erase(r->id);
    throw;
  }
  Request* leader = group[0];
  if (prompt.size() >= 2) leader->forks.assign(group.begin() + 1, group.end());
  waiting_.push_back(leader);
  if (prompt.size() < 2) waiting_.insert(waiting_.end(), group.begin() + 1, group.end());
  std::vector<uint64_t> ids;
  for (Request* r : group) ids.push_back(r->id);
  return ids;
}

Scheduler::Request* Scheduler::make_request(std::vector<int32_t> prompt, const RequestParams& params) {
  const ModelConfig& config = model_.config();
  if (prompt.empty()) fail(ErrorKind::kInvalidRequest, "the prompt is empty");
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] < 0 || prompt[i] >= config.vocab_size)
      fail(ErrorKind::kInvalidRequest, "prompt token id ", prompt[i], " at index ", i, " is out of range [0, ",
           config.vocab_size, ")");
  if (!config.sliding_window && static_cast<int64_t>(prompt.size()) >= config.max_seq_len)
    fail(ErrorKind::kInvalidRequest, "the prompt has ", prompt.size(), " tokens; max_seq_len ", config.max_seq_len,
         " leaves no room to generate");
  if (params.max_tokens < 1) fail(ErrorKind::kInvalidRequest, "max_tokens must be >= 1, got ", params.max_tokens);
  if (params.min_tokens < 0) fail(ErrorKind::kInvalidRequest, "min_tokens must be >= 0, got ", params.min_tokens);
  check_controls(params.controls);
  for (int32_t id : params.stop_token_ids)
    if (id < 0 || id >= config.vocab_size) fail(ErrorKind::kInvalidRequest, "stop token id ", id, " is out of range");
  for (const auto& [id, bias] : params.logit_bias)
    if (id < 0 || id >= config.vocab_size || !std::isfinite(bias))
      fail(ErrorKind::kInvalidRequest, "logit_bias entry (", id, ", ", bias, ") is out of range");
  if (params.eos_id >= config.vocab_size) fail(ErrorKind::kInvalidRequest, "eos id ", params.eos_id, " is out of range");

  auto request = std::make_unique<Request>();
  request->id = next_id_++;
  request->prompt = std::move(prompt);
  request->params = params;
  for (int32_t token : request->prompt)
    if (request->history_index.emplace(token, request->history.size()).second) {
      request->history.push_back(token);
      request->history_counts.push_back(0);
    }
  const int64_t needed = blocks_to_fit_alone(static_cast<int64_t>(request->prompt.size()), params.max_tokens);
  if (needed > model_.num_blocks())
    fail(ErrorKind::kInvalidRequest, "this request needs ", needed, " KV blocks (", request->prompt.size(),
         " prompt tokens + max_tokens ", params.max_tokens, ") but the pool has only ", model_.num_blocks(),
         ": shorten it or load the model with more num_blocks");
  Request* raw = request.get();
  requests_.emplace(raw->id, std::move(request));
  return raw;
}

void Scheduler::fork_waiting_samples(Request* leader) {
  for (Request* r : leader->forks) {
    const bool fits = model_.free_blocks() >= model_.blocks_in_use(leader->seq) &&
                      static_cast<int32_t>(running_.size()) < options_.max_num_seqs;
    if (fits) {
      r->seq = model_.fork_sequence(leader->seq);
      r->computed = leader->computed;
      running_.push_back(r);
    } else {
      waiting_.push_back(r);  // no room to share: it computes its prompt alone, later
    }
  }
  leader->forks.clear();
}

void Scheduler::release_forks(Request* leader) {
  // Samples still waiting for this prefill compute their prompt alone.
  for (Request* r : leader->forks) waiting_.push_back(r);
  leader->forks.clear();
}

void Scheduler::release(Request* r) {
  if (r->seq >= 0) model_.free_sequence(r->seq);
  r->seq = -1;
  r->computed = 0;
  running_.erase(std::remove(running_.begin(), running_.end(), r), running_.end());
}

void Scheduler::preempt(Request* r) {
  release(r);
  waiting_.push_front(r);  // first in line: it was admitted before everything still waiting
  ++stats_.preemptions;
}

bool Scheduler::abort(uint64_t id) {
  auto it = requests_.find(id);
  if (it == requests_.end()) return false;
  Request* r = it->second.get();
  release_forks(r);
  for (auto& [other_id, other] : requests_) {  // a sample aborted while it waits for its fork
    auto& forks = other->forks;
    forks.erase(std::remove(forks.begin(), forks.end(), r), forks.end());
  }
  release(r);
  waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), r), waiting_.end());
  requests_.erase(it);
  return true;
}

FinishReason Scheduler::accept(Request* r, const SampledToken& sampled, int32_t* stop_token) {
  const int32_t token = sampled.token;
  r->output.push_back(token);
  auto [it, inserted] = r->history_index.emplace(token, r->history.size());
  if (inserted) {
    r->history.push_back(token);
    r->history_counts.push_back(0);
  }
  ++r->history_counts[it->second];
  const RequestParams& p = r->params;
  if (token == p.eos_id && !p.ignore_eos) {
    *stop_token = token;
    return FinishReason::kStop;
  }
  if (std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), token) != p.stop_token_ids.end()) {
    *stop_token = token;
    return FinishReason::kStop;
  }
  if (static_cast<int64_t>(r->output.size()) >= p.max_tokens) return FinishReason::kLength;
  const ModelConfig& config = model_.config();
  if (!config.sliding_window && r->total() >= config.max_seq_len) return FinishReason::kLength;
  return FinishReason::kNone;
}

std::vector<RequestUpdate> Scheduler::step() {
  const auto started = std::chrono::steady_clock::now();
  int64_t budget = options_.max_num_batched_tokens;
  int64_t reserved = 0;  // blocks the entries scheduled so far will take
  auto available = [&] { return model_.free_blocks() - reserved; };
  std::vector<std::pair<Request*, int64_t>> scheduled;

  // Running requests first, oldest first: their next token, or the next chunk of their prompt.
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Request* r = running_[i];
    const int64_t n = std::min(r->target() - r->computed, budget);
    if (n <= 0) {
      ++i;
      continue;
    }
    const int64_t need = model_.blocks_needed(r->seq, n);
    while (need > available() && running_.size() > i + 1)
      preempt(running_.back());  // the most recently admitted, never yet scheduled this step
    if (need > available()) {
      preempt(r);  // nothing newer left to take blocks from
      continue;
    }
    scheduled.emplace_back(r, n);
    budget -= n;
    reserved += need;
    ++i;
  }
  // Then admissions, first in line first, while blocks, budget and sequence slots last.
  while (!waiting_.empty() && budget > 0 && static_cast<int32_t>(running_.size()) < options_.max_num_seqs) {
    Request* r = waiting_.front();
    const int64_t n = std::min(r->target(), budget);
    const int64_t need = model_.blocks_needed(-1, n);
    if (need > available()) break;
    waiting_.pop_front();
    r->seq = model_.add_sequence();
    r->computed = 0;
    running_.push_back(r);
    scheduled.emplace_back(r, n);
    budget -= n;
    reserved += need;
  }
  std::vector<RequestUpdate> updates;
  if (scheduled.empty()) {
    stats_.last_step_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    stats_.last_forward_seconds = 0;
    return updates;
  }

  std::vector<StepEntry> entries;
  std::vector<EntrySampling> sampling(scheduled.size());
  std::vector<const EntrySampling*> sampling_of(scheduled.size(), nullptr);
  int32_t batch_tokens = 0;
  for (size_t k = 0; k < scheduled.size(); ++k) {
    auto [r, n] = scheduled[k];
    StepEntry entry;
    entry.seq = r->seq;
    for (int64_t i = r->computed; i < r->computed + n; ++i) entry.tokens.push_back(r->token_at(i));
    entries.push_back(std::move(entry));
    batch_tokens += static_cast<int32_t>(n);
    if (r->computed + n < r->total()) continue;  // a prompt chunk: nothing to sample yet
    EntrySampling& s = sampling[k];
    s.controls = r->params.controls;
    s.controls.position = static_cast<int64_t>(r->output.size());
    // The token history only matters to penalties: without them none is sent to the sampler
    // (it grows with the prompt, and would be copied every step).
    const SamplingControls& c = s.controls;
    static const std::vector<int32_t> kNoHistory;
    const bool penalized = c.repetition_penalty != 1.0f || c.presence_penalty != 0.0f || c.frequency_penalty != 0.0f;
    s.history_ids = penalized ? &r->history : &kNoHistory;
    s.output_counts = penalized ? &r->history_counts : &kNoHistory;
    s.logit_bias = &r->params.logit_bias;
    r->banned.clear();
    if (static_cast<int32_t>(r->output.size()) < r->params.min_tokens) {
      if (r->params.eos_id >= 0 && !r->params.ignore_eos) r->banned.push_back(r->params.eos_id);
      r->banned.insert(r->banned.end(), r->params.stop_token_ids.begin(), r->params.stop_token_ids.end());
    }
    s.banned = &r->banned;
    sampling_of[k] = &s;
  }

  std::vector<SampledToken> sampled;
  const double compute_before = model_.compute_seconds();
  model_.step_and_sample(entries, sampling_of, &sampled);
  const double compute = model_.compute_seconds() - compute_before;

  for (size_t k = 0; k < scheduled.size(); ++k) {
    auto [r, n] = scheduled[k];
    r->computed += n;
    if (!r->forks.empty() && r->computed == r->target()) fork_waiting_samples(r);
    if (sampling_of[k] == nullptr) continue;
    RequestUpdate update;
    update.id = r->id;
    update.tokens.push_back(sampled[k]);
    update.finish = accept(r, sampled[k], &update.stop_token);
    if (update.finish != FinishReason::kNone) {
      release(r);
      requests_.erase(r->id);
    }
    updates.push_back(std::move(update));
  }
  ++stats_.steps;
  stats_.last_batch_tokens = batch_tokens;
  stats_.last_batch_seqs = static_cast<int32_t>(scheduled.size());
  stats_.last_forward_seconds = compute;
  stats_.last_step_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  return updates;
}

}  // namespace mc
