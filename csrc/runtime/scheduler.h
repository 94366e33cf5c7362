// Continuous batching in the core: requests (prompt ids + sampling params) wait in a queue; each
// iteration decodes every running request and spends the rest of a token budget
// (max_num_batched_tokens) on prompt chunks, up to max_num_seqs running sequences. Admission
// checks free KV blocks; when a running request cannot get a block, the most recently admitted
// one is preempted (its blocks freed, requeued first, recomputed from prompt + output; sampling
// is keyed by (seed, stream, position), so its tokens do not change). Token-level finish
// conditions are decided here; stop strings need text and end a request through abort().
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "runtime/model.h"

namespace mc {

struct RequestParams {
  SamplingControls controls;  // seed, stream, temperature, ...; position is set per token
  std::vector<std::pair<int32_t, float>> logit_bias;
  int32_t max_tokens = 16;
  int32_t min_tokens = 0;      // EOS and stop ids masked until this many tokens exist
  std::vector<int32_t> stop_token_ids;
  int32_t eos_id = -1;         // -1: none
  bool ignore_eos = false;
};

enum class FinishReason { kNone, kStop, kLength, kAbort };
const char* finish_reason_name(FinishReason reason);

// What one step produced for one request.
struct RequestUpdate {
  uint64_t id = 0;
  std::vector<SampledToken> tokens;  // new tokens (one per step at most)
  FinishReason finish = FinishReason::kNone;
  int32_t stop_token = -1;           // the stop id (or EOS) that finished it, else -1
};

struct SchedulerOptions {
  int32_t max_num_seqs = 64;
  int32_t max_num_batched_tokens = 2048;
};

struct SchedulerStats {
  int64_t steps = 0;
  int64_t preemptions = 0;
  double last_step_seconds = 0;      // the whole step() call
  double last_forward_seconds = 0;   // in the backend's ops (layers, LM head, sampler)
  int32_t last_batch_tokens = 0;
  int32_t last_batch_seqs = 0;
};

class Scheduler {
 public:
  Scheduler(Model& model, const SchedulerOptions& options);
  ~Scheduler();

  // Queues a request. Throws kInvalidRequest (nothing queued) for a bad prompt or params, or a
  // request that could not fit the KV pool even alone.
  uint64_t add(std::vector<int32_t> prompt, const RequestParams& params);
  // Queues the n samples of one prompt (params[i] for sample i) sharing its prefill: the first
  // computes all but the last prompt token, then the others fork its cached K/V (copied into
  // blocks of their own) and go on alone. Returns their ids in order.
  std::vector<uint64_t> add_group(const std::vector<int32_t>& prompt, const std::vector<RequestParams>& params);
  // Frees the request's blocks at once; unknown or finished ids are ignored. Returns whether it
  // was still unfinished.
  bool abort(uint64_t id);
  // One iteration; updates for the requests that got a token or finished.
  std::vector<RequestUpdate> step();

  bool has_unfinished() const { return !running_.empty() || !waiting_.empty(); }
  // The id the next request will get (ids count up, never reused): a caller can record its
  // requests before add() returns, so an interruption right after cannot lose them.
  uint64_t next_request_id() const { return next_id_; }
  size_t num_running() const { return running_.size(); }
  size_t num_waiting() const { return waiting_.size(); }
  const SchedulerStats& stats() const { return stats_; }
  const SchedulerOptions& options() const { return options_; }
  // KV blocks a request of this many prompt tokens and max_tokens needs when it runs alone:
  // add() refuses one needing more than the pool has.
  int64_t blocks_to_fit_alone(int64_t prompt_tokens, int32_t max_tokens) const;

 private:
  struct Request {
    uint64_t id = 0;
    std::vector<int32_t> prompt;
    RequestParams params;
    std::vector<int32_t> output;
    std::vector<int32_t> history;        // distinct prompt and output ids
    std::vector<int32_t> history_counts; // their counts in the output
    std::unordered_map<int32_t, size_t> history_index;
    std::vector<int32_t> banned;
    int32_t seq = -1;
    int64_t computed = 0;                // tokens of prompt + output in the KV cache
    std::vector<Request*> forks;         // samples of the same prompt waiting for this prefill
    int64_t total() const { return static_cast<int64_t>(prompt.size() + output.size()); }
    // Where this step's computation may go: all known tokens, or (with samples waiting to
    // fork) all but the last prompt token, whose logits each sample draws from itself.
    int64_t target() const { return forks.empty() ? total() : static_cast<int64_t>(prompt.size()) - 1; }
    int32_t token_at(int64_t i) const {
      return i < static_cast<int64_t>(prompt.size()) ? prompt[i] : output[i - prompt.size()];
    }
  };

  Request* make_request(std::vector<int32_t> prompt, const RequestParams& params);
  void fork_waiting_samples(Request* leader);
  void release_forks(Request* leader);
  void preempt(Request* request);
  void release(Request* request);
  // Appends `token` and returns the finish reason it causes.
  FinishReason accept(Request* request, const SampledToken& token, int32_t* stop_token);

  Model& model_;
  SchedulerOptions options_;
  std::map<uint64_t, std::unique_ptr<Request>> requests_;  // unfinished ones
  std::vector<Request*> running_;                           // in admission order
  std::deque<Request*> waiting_;
  uint64_t next_id_ = 1;
  SchedulerStats stats_;
};

}  // namespace mc
