// A small chat service on the mistral_cuda C API: every line read from stdin is one user message
// from its own client; all of them are served at once through one engine. Each client thread
// applies Mistral's v1 chat template, tokenizes with SentencePiece, queues its request and
// streams its reply to stdout as it is generated; one thread steps the engine.
//
//   chat_service MODEL_DIR [--tokenizer FILE] [--device cpu|cuda|auto] [--max-tokens N]
//                [--temperature T] [--seed S] [--print-ids]
//
// stdout: "[<client>] <text delta>" lines (newlines in the text written as \n, backslashes as
// \\); stderr: one summary line per client (with --print-ids, also its prompt and output ids).
//
// The template (mistral_common's v1 instruct tokenizer): BOS, then "[INST] {message} [/INST]"
// encoded as plain text. Newer tokenizers (v3, Tekken) have [INST] as control tokens; they need
// their own template code.
#include <mistral_cuda.h>
#include <sentencepiece_processor.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Options {
  std::string model_dir;
  std::string tokenizer;  // default: MODEL_DIR/tokenizer.model
  std::string device = "cpu";
  int max_tokens = 128;
  float temperature = 0.7f;
  uint64_t seed = MC_SEED_RANDOM;
  bool print_ids = false;
};

[[noreturn]] void die(const std::string& message) {
  std::fprintf(stderr, "chat_service: %s\n", message.c_str());
  std::exit(1);
}

void check(mc_status status, const char* what) {
  if (status != MC_OK) die(std::string(what) + ": " + mc_status_str(status) + ": " + mc_last_error());
}

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) die(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--tokenizer") o.tokenizer = value();
    else if (arg == "--device") o.device = value();
    else if (arg == "--max-tokens") o.max_tokens = std::atoi(value().c_str());
    else if (arg == "--temperature") o.temperature = std::strtof(value().c_str(), nullptr);
    else if (arg == "--seed") o.seed = std::strtoull(value().c_str(), nullptr, 10);
    else if (arg == "--print-ids") o.print_ids = true;
    else if (!arg.empty() && arg[0] == '-') die("unknown option " + arg);
    else if (o.model_dir.empty()) o.model_dir = arg;
    else die("one model directory only");
  }
  if (o.model_dir.empty()) die("usage: chat_service MODEL_DIR [--tokenizer FILE] [--device D] [--max-tokens N] ...");
  if (o.tokenizer.empty()) o.tokenizer = o.model_dir + "/tokenizer.model";
  return o;
}

std::string join(const std::vector<int32_t>& ids) {
  std::string out;
  for (size_t i = 0; i < ids.size(); ++i) out += (i ? "," : "") + std::to_string(ids[i]);
  return out;
}

std::string escape(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (c == '\n') out += "\\n";
    else if (c == '\\') out += "\\\\";
    else out += c;
  }
  return out;
}

// The engine and what its clients wait on: the stepping thread bumps `steps` after each step.
class Service {
 public:
  Service(mc_engine* engine, const sentencepiece::SentencePieceProcessor& tokenizer, const Options& options)
      : engine_(engine), tokenizer_(tokenizer), options_(options) {}

  void client_joined() {
    std::lock_guard<std::mutex> lock(mutex_);
    ++clients_;
    changed_.notify_all();
  }

  void input_ended() {
    std::lock_guard<std::mutex> lock(mutex_);
    input_open_ = false;
    changed_.notify_all();
  }

  // Steps while any client is active; returns once the input has ended and every client is done.
  void run_steps() {
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        changed_.wait(lock, [&] { return clients_ > 0 || !input_open_; });
        if (clients_ == 0 && !input_open_) return;
      }
      // A client may still be tokenizing: this step has nothing to do then, and returns at once.
      size_t unfinished = 0;
      check(mc_engine_step(engine_, &unfinished), "mc_engine_step");
      if (unfinished == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      std::lock_guard<std::mutex> lock(mutex_);
      ++steps_;
      changed_.notify_all();
    }
  }

  // One client: template, tokenize, queue, then stream the reply until it finishes.
  void serve(int client, const std::string& message) {
    std::vector<int> pieces;
    const auto encoded = tokenizer_.Encode("[INST] " + message + " [/INST]", &pieces);
    if (!encoded.ok()) die("tokenizing: " + encoded.ToString());
    std::vector<int32_t> prompt{tokenizer_.bos_id()};
    prompt.insert(prompt.end(), pieces.begin(), pieces.end());

    mc_sampling_params params = mc_sampling_default_params();
    params.max_tokens = options_.max_tokens;
    params.temperature = options_.temperature;
    params.seed = options_.seed;
    uint64_t id = 0;
    check(mc_request_add(engine_, prompt.data(), prompt.size(), &params, &id), "mc_request_add");

    const auto start = std::chrono::steady_clock::now();
    std::vector<int32_t> output(static_cast<size_t>(options_.max_tokens));
    size_t n = 0, shown_bytes = 0;
    int finished = 0;
    uint64_t seen_step = 0;
    while (!finished) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        changed_.wait(lock, [&] { return steps_ != seen_step; });
        seen_step = steps_;
      }
      check(mc_request_read(engine_, id, output.data(), output.size(), &n, &finished), "mc_request_read");
      // Decode all tokens so far and print what is new: SentencePiece's spaces and multi-byte
      // characters depend on neighbouring tokens, so pieces cannot be decoded one by one.
      std::string text;
      tokenizer_.Decode(std::vector<int>(output.begin(), output.begin() + n), &text);
      const bool incomplete = text.size() >= 3 && text.compare(text.size() - 3, 3, "\xEF\xBF\xBD") == 0;
      const size_t ready = finished || !incomplete ? text.size() : text.size() - 3;
      if (ready > shown_bytes) {
        std::lock_guard<std::mutex> lock(output_mutex_);
        std::printf("[%d] %s\n", client, escape(text.substr(shown_bytes, ready - shown_bytes)).c_str());
        std::fflush(stdout);
        shown_bytes = ready;
      }
    }

    mc_request_info info;
    info.struct_size = sizeof(info);
    check(mc_request_get_info(engine_, id, &info), "mc_request_get_info");
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    {
      std::lock_guard<std::mutex> lock(output_mutex_);
      std::fprintf(stderr, "client %d: %zu prompt tokens, %zu generated (%s) in %.2f s\n", client, prompt.size(), n,
                   mc_finish_reason_str(info.finish_reason), seconds);
      if (options_.print_ids)
        std::fprintf(stderr, "request %d prompt_ids=%s output_ids=%s\n", client, join(prompt).c_str(),
                     join(std::vector<int32_t>(output.begin(), output.begin() + n)).c_str());
    }
    check(mc_request_release(engine_, id), "mc_request_release");
    std::lock_guard<std::mutex> lock(mutex_);
    --clients_;
    changed_.notify_all();
  }

 private:
  mc_engine* engine_;
  const sentencepiece::SentencePieceProcessor& tokenizer_;
  const Options& options_;
  std::mutex mutex_;
  std::condition_variable changed_;
  int clients_ = 0;
  bool input_open_ = true;
  uint64_t steps_ = 0;
  std::mutex output_mutex_;
};

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse_options(argc, argv);
  sentencepiece::SentencePieceProcessor tokenizer;
  const auto loaded = tokenizer.Load(options.tokenizer);
  if (!loaded.ok()) die("loading the tokenizer " + options.tokenizer + ": " + loaded.ToString());

  mc_model_params model_params = mc_model_default_params();
  model_params.device = options.device.c_str();
  mc_model* model = nullptr;
  check(mc_model_load(options.model_dir.c_str(), &model_params, &model), "mc_model_load");
  mc_model_config config;
  config.struct_size = sizeof(config);
  check(mc_model_get_config(model, &config), "mc_model_get_config");
  if (config.vocab_size < tokenizer.GetPieceSize()) die("the tokenizer has more pieces than the model's vocabulary");
  std::fprintf(stderr, "mistral_cuda %s: %lld layers, dim %lld, vocab %lld on %s (%s)\n", mc_version(),
               static_cast<long long>(config.n_layers), static_cast<long long>(config.dim),
               static_cast<long long>(config.vocab_size), config.device, config.dtype);

  mc_engine_params engine_params = mc_engine_default_params();
  mc_engine* engine = nullptr;
  check(mc_engine_create(model, &engine_params, &engine), "mc_engine_create");

  Service service(engine, tokenizer, options);
  std::thread stepper([&] { service.run_steps(); });
  std::vector<std::thread> clients;
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.empty()) continue;
    const int client = static_cast<int>(clients.size()) + 1;
    service.client_joined();
    clients.emplace_back([&service, client, line] { service.serve(client, line); });
  }
  service.input_ended();
  for (std::thread& t : clients) t.join();
  stepper.join();

  mc_engine_free(engine);
  mc_model_free(model);
  return 0;
}
