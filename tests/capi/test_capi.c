/* The C API driven from C99, built against the installed package (find_package(mistral_cuda)).
 * tests/test_capi.py runs each mode and checks what it prints against the Python engine and
 * transformers; the checks that need no oracle (error paths, lifetimes) are made here.
 *
 *   test_capi generate MODEL MAX_TOKENS IGNORE_EOS PROMPT...   greedy, all prompts in one engine
 *   test_capi cancel   MODEL PROMPT                           cancel and release mid-run
 *   test_capi threads  MODEL PROMPT N_CLIENTS                 client threads + a stepping thread
 *   test_capi progress MODEL                                  the progress callback, and cancelling
 *   test_capi errors   MODEL FULL_ATTENTION_MODEL BROKEN_DIR MISSING_DIR
 *
 * A PROMPT is comma-separated token ids. Output lines: "request <i> finish=<reason>
 * tokens=<ids> logprobs=<values>" and "<mode>: ok". Any failed check prints "FAIL ..." and
 * exits 1. */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mistral_cuda.h>

#define MAX_PROMPTS 16
#define MAX_IDS 4096

static int n_checks = 0;

#define CHECK(cond)                                                                          \
  do {                                                                                       \
    ++n_checks;                                                                              \
    if (!(cond)) {                                                                           \
      fprintf(stderr, "FAIL %s:%d: %s (last error: %s)\n", __FILE__, __LINE__, #cond,        \
              mc_last_error());                                                              \
      exit(1);                                                                               \
    }                                                                                        \
  } while (0)

/* A call expected to fail with `status`, leaving a message. */
#define CHECK_STATUS(call, status)                                                           \
  do {                                                                                       \
    mc_status got_ = (call);                                                                 \
    ++n_checks;                                                                              \
    if (got_ != (status) || ((status) != MC_OK && mc_last_error()[0] == '\0')) {             \
      fprintf(stderr, "FAIL %s:%d: %s gave %s, expected %s (last error: %s)\n", __FILE__,    \
              __LINE__, #call, mc_status_str(got_), mc_status_str(status), mc_last_error()); \
      exit(1);                                                                               \
    }                                                                                        \
  } while (0)

#define OK(call) CHECK_STATUS(call, MC_OK)

typedef struct {
  int32_t ids[MAX_IDS];
  size_t n;
} token_list;

static token_list parse_ids(const char* text) {
  token_list list;
  const char* p = text;
  list.n = 0;
  while (*p != '\0' && list.n < MAX_IDS) {
    char* end;
    long id = strtol(p, &end, 10);
    CHECK(end != p);
    list.ids[list.n++] = (int32_t)id;
    p = *end == ',' ? end + 1 : end;
  }
  return list;
}

static mc_model* load(const char* dir) {
  mc_model_params params = mc_model_default_params();
  mc_model* model = NULL;
  OK(mc_model_load(dir, &params, &model));
  CHECK(model != NULL);
  return model;
}

static mc_engine* engine_on(mc_model* model, int64_t num_blocks) {
  mc_engine_params params = mc_engine_default_params();
  mc_engine* engine = NULL;
  params.num_blocks = num_blocks;
  OK(mc_engine_create(model, &params, &engine));
  return engine;
}

static mc_sampling_params greedy(int32_t max_tokens, bool ignore_eos) {
  mc_sampling_params params = mc_sampling_default_params();
  params.temperature = 0.0f;
  params.max_tokens = max_tokens;
  params.ignore_eos = ignore_eos;
  return params;
}

static void run_to_end(mc_engine* engine) {
  size_t unfinished = 1;
  int steps = 0;
  while (unfinished > 0) {
    OK(mc_engine_step(engine, &unfinished));
    CHECK(++steps < 100000);
  }
}

static void print_request(mc_engine* engine, int index, uint64_t id) {
  static int32_t tokens[MAX_IDS];
  static float logprobs[MAX_IDS];
  size_t n = 0, n_logprobs = 0, i;
  int finished = 0;
  mc_request_info info;
  info.struct_size = sizeof(info);
  OK(mc_request_read(engine, id, tokens, MAX_IDS, &n, &finished));
  OK(mc_request_get_info(engine, id, &info));
  OK(mc_request_read_logprobs(engine, id, logprobs, MAX_IDS, &n_logprobs));
  CHECK(finished == 1 && info.finished == 1 && info.n_generated == n && n_logprobs == n);
  printf("request %d finish=%s stop_token=%d tokens=", index, mc_finish_reason_str(info.finish_reason),
         (int)info.stop_token);
  for (i = 0; i < n; ++i) printf(i ? ",%d" : "%d", (int)tokens[i]);
  printf(" logprobs=");
  for (i = 0; i < n; ++i) printf(i ? ",%.6f" : "%.6f", logprobs[i]);
  printf("\n");
}

/* ---- generate: every prompt at once, read while stepping ---- */

static int mode_generate(int argc, char** argv) {
  mc_model* model;
  mc_engine* engine;
  mc_sampling_params params;
  uint64_t ids[MAX_PROMPTS];
  size_t seen[MAX_PROMPTS];
  int n_prompts = argc - 5, i;
  size_t unfinished = 1;
  CHECK(n_prompts >= 1 && n_prompts <= MAX_PROMPTS);
  model = load(argv[2]);
  engine = engine_on(model, 0);
  params = greedy(atoi(argv[3]), atoi(argv[4]) != 0);
  for (i = 0; i < n_prompts; ++i) {
    token_list prompt = parse_ids(argv[5 + i]);
    OK(mc_request_add(engine, prompt.ids, prompt.n, &params, &ids[i]));
    seen[i] = 0;
  }
  while (unfinished > 0) {
    OK(mc_engine_step(engine, &unfinished));
    /* Streaming: a read returns everything from the first token, one more per step at most. */
    for (i = 0; i < n_prompts; ++i) {
      int32_t first[2];
      size_t n = 0, n_all = 0;
      int finished = 0;
      mc_request_info info;
      info.struct_size = sizeof(info);
      OK(mc_request_get_info(engine, ids[i], &info));
      n_all = info.n_generated;
      CHECK(n_all == seen[i] || n_all == seen[i] + 1);
      OK(mc_request_read(engine, ids[i], first, 2, &n, &finished));
      CHECK(n == (n_all < 2 ? n_all : 2));
      seen[i] = n_all;
    }
  }
  for (i = 0; i < n_prompts; ++i) print_request(engine, i, ids[i]);
  for (i = 0; i < n_prompts; ++i) OK(mc_request_release(engine, ids[i]));
  mc_engine_free(engine);
  mc_model_free(model);
  printf("generate: ok\n");
  return 0;
}

/* ---- cancel: four copies of a prompt; cancel one and release one mid-run ---- */

static int mode_cancel(char** argv) {
  enum { kRequests = 4, kSteps = 3 };
  mc_model* model = load(argv[2]);
  mc_engine* engine = engine_on(model, 0);
  mc_sampling_params params = greedy(12, true);
  token_list prompt = parse_ids(argv[3]);
  uint64_t ids[kRequests];
  int32_t tokens[64];
  size_t n = 0, unfinished = 0;
  int finished = 0, i;
  mc_request_info info;
  info.struct_size = sizeof(info);
  for (i = 0; i < kRequests; ++i) OK(mc_request_add(engine, prompt.ids, prompt.n, &params, &ids[i]));
  for (i = 0; i < kSteps; ++i) OK(mc_engine_step(engine, &unfinished));
  CHECK(unfinished == kRequests);

  OK(mc_request_cancel(engine, ids[1]));
  OK(mc_request_read(engine, ids[1], tokens, 64, &n, &finished));
  CHECK(finished == 1 && n == kSteps);
  OK(mc_request_get_info(engine, ids[1], &info));
  CHECK(info.finish_reason == MC_FINISH_ABORT && info.stop_token == -1);
  OK(mc_request_cancel(engine, ids[1])); /* already finished: nothing to do */
  OK(mc_request_release(engine, ids[2])); /* unfinished: cancelled and forgotten */
  CHECK_STATUS(mc_request_read(engine, ids[2], tokens, 64, &n, &finished), MC_ERR_NOT_FOUND);
  CHECK_STATUS(mc_request_cancel(engine, ids[2]), MC_ERR_NOT_FOUND);
  OK(mc_engine_step(engine, &unfinished));
  CHECK(unfinished == 2);
  run_to_end(engine);

  OK(mc_request_read(engine, ids[1], tokens, 64, &n, &finished));
  CHECK(n == kSteps); /* nothing more came after the cancel */
  printf("cancelled tokens=");
  for (i = 0; i < (int)n; ++i) printf(i ? ",%d" : "%d", (int)tokens[i]);
  printf("\n");
  print_request(engine, 0, ids[0]);
  print_request(engine, 3, ids[3]);
  OK(mc_request_release(engine, ids[1]));
  CHECK_STATUS(mc_request_release(engine, ids[1]), MC_ERR_NOT_FOUND);
  /* ids[0] and ids[3] stay unreleased: mc_engine_free frees them. */
  mc_engine_free(engine);
  mc_model_free(model);
  printf("cancel: ok\n");
  return 0;
}

/* ---- threads: each client adds a request and polls it; one thread steps ---- */

typedef struct {
  mc_engine* engine;
  const token_list* prompt;
  int seed;
  int32_t tokens[64];
  size_t n;
  int done;
} client;

static pthread_mutex_t clients_mutex = PTHREAD_MUTEX_INITIALIZER;
static int clients_left = 0;

static void* client_main(void* arg) {
  client* c = (client*)arg;
  mc_sampling_params params = mc_sampling_default_params();
  uint64_t id = 0;
  int finished = 0;
  params.max_tokens = 16;
  params.seed = (uint64_t)c->seed;
  params.ignore_eos = true;
  OK(mc_request_add(c->engine, c->prompt->ids, c->prompt->n, &params, &id));
  while (!finished) {
    OK(mc_request_read(c->engine, id, c->tokens, 64, &c->n, &finished));
    sched_yield(); /* polling: let the stepping thread at the engine */
  }
  OK(mc_request_release(c->engine, id));
  pthread_mutex_lock(&clients_mutex);
  --clients_left;
  pthread_mutex_unlock(&clients_mutex);
  return NULL;
}

static void* stepper_main(void* arg) {
  mc_engine* engine = (mc_engine*)arg;
  for (;;) {
    int left;
    pthread_mutex_lock(&clients_mutex);
    left = clients_left;
    pthread_mutex_unlock(&clients_mutex);
    if (left == 0) break;
    OK(mc_engine_step(engine, NULL)); /* MC_OK also while no request is queued yet */
  }
  return NULL;
}

static int mode_threads(char** argv) {
  enum { kMaxClients = 16 };
  mc_model* model = load(argv[2]);
  mc_engine* engine = engine_on(model, 0);
  token_list prompt = parse_ids(argv[3]);
  int n_clients = atoi(argv[4]), i, j;
  static client clients[kMaxClients];
  pthread_t threads[kMaxClients], stepper;
  CHECK(n_clients >= 1 && n_clients <= kMaxClients);
  clients_left = n_clients;
  for (i = 0; i < n_clients; ++i) {
    clients[i].engine = engine;
    clients[i].prompt = &prompt;
    clients[i].seed = i % 2; /* pairs of clients share a seed: same tokens, whatever the batch */
    CHECK(pthread_create(&threads[i], NULL, client_main, &clients[i]) == 0);
  }
  CHECK(pthread_create(&stepper, NULL, stepper_main, engine) == 0);
  for (i = 0; i < n_clients; ++i) CHECK(pthread_join(threads[i], NULL) == 0);
  CHECK(pthread_join(stepper, NULL) == 0);
  for (i = 0; i < n_clients; ++i) {
    CHECK(clients[i].n == 16);
    for (j = 0; j < 16; ++j) CHECK(clients[i].tokens[j] == clients[i % 2].tokens[j]);
  }
  mc_engine_free(engine);
  mc_model_free(model);
  printf("threads: ok\n");
  return 0;
}

/* ---- progress ---- */

typedef struct {
  int calls;
  int64_t last_done, total;
  int cancel_after;
} progress_state;

static bool on_progress(int64_t done, int64_t total, void* user_data) {
  progress_state* s = (progress_state*)user_data;
  CHECK(done >= s->last_done && done <= total && total > 0);
  s->last_done = done;
  s->total = total;
  return ++s->calls < s->cancel_after;
}

static int mode_progress(char** argv) {
  mc_model_params params = mc_model_default_params();
  mc_model* model = NULL;
  progress_state state;
  memset(&state, 0, sizeof(state));
  state.cancel_after = 1 << 30;
  params.progress = on_progress;
  params.progress_user_data = &state;
  OK(mc_model_load(argv[2], &params, &model));
  CHECK(state.calls > 1 && state.last_done == state.total);
  mc_model_free(model);

  memset(&state, 0, sizeof(state));
  state.cancel_after = 1;
  model = NULL;
  CHECK_STATUS(mc_model_load(argv[2], &params, &model), MC_ERR_CANCELLED);
  CHECK(model == NULL && state.calls == 1);
  printf("progress: ok\n");
  return 0;
}

/* ---- errors: every refusal, and no crash ---- */

static void check_bad_sampling(mc_engine* engine, const mc_sampling_params* params) {
  int32_t prompt[3] = {1, 100, 200};
  uint64_t id = 12345;
  CHECK_STATUS(mc_request_add(engine, prompt, 3, params, &id), MC_ERR_INVALID_ARGUMENT);
  CHECK(id == 12345); /* outputs untouched on error */
}

static int mode_errors(char** argv) {
  const char* model_dir = argv[2];
  const char* full_attention_dir = argv[3];
  const char* broken_dir = argv[4];
  const char* missing_dir = argv[5];
  mc_model_params mp = mc_model_default_params();
  mc_engine_params ep = mc_engine_default_params();
  mc_sampling_params sp;
  mc_model_config config;
  mc_request_info info;
  mc_model *model = NULL, *other = NULL;
  mc_engine *engine = NULL, *second = NULL;
  int32_t prompt[3] = {1, 100, 200}, tokens[8], ids[4];
  int32_t long_prompt[40];
  float logprobs[8];
  mc_logit_bias bias;
  uint64_t id = 0;
  size_t n = 0, unfinished = 99;
  int finished = 0, i, not_a_handle = 0;

  CHECK(strcmp(mc_version(), MC_VERSION_STRING) == 0);
  CHECK(strcmp(mc_status_str(MC_ERR_CACHE_FULL), "MC_ERR_CACHE_FULL") == 0);
  CHECK(strcmp(mc_status_str((mc_status)99), "unknown status") == 0);
  CHECK(strcmp(mc_finish_reason_str(MC_FINISH_LENGTH), "length") == 0);
  CHECK(MC_OK == 0 && MC_ERR_INVALID_ARGUMENT == 1 && MC_ERR_INTERNAL == 7);

  /* Loading. */
  CHECK_STATUS(mc_model_load(NULL, &mp, &model), MC_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(mc_model_load(model_dir, NULL, &model), MC_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(mc_model_load(model_dir, &mp, NULL), MC_ERR_INVALID_ARGUMENT);
  mp.struct_size = sizeof(mp) - 8;
  CHECK_STATUS(mc_model_load(model_dir, &mp, &model), MC_ERR_INVALID_ARGUMENT);
  mp = mc_model_default_params();
  mp.device = NULL;
  CHECK_STATUS(mc_model_load(model_dir, &mp, &model), MC_ERR_INVALID_ARGUMENT);
  mp.device = "tpu";
  CHECK_STATUS(mc_model_load(model_dir, &mp, &model), MC_ERR_INVALID_ARGUMENT);
  mp.device = "cuda"; /* this test's library is built without CUDA */
  CHECK_STATUS(mc_model_load(model_dir, &mp, &model), MC_ERR_UNSUPPORTED);
  mp = mc_model_default_params();
  mp.dtype = "float64";
  CHECK_STATUS(mc_model_load(model_dir, &mp, &model), MC_ERR_INVALID_ARGUMENT);
  mp = mc_model_default_params();
  mp.quantization = "int3";
  CHECK_STATUS(mc_model_load(model_dir, &mp, &model), MC_ERR_INVALID_ARGUMENT);
  mp = mc_model_default_params();
  mp.block_size = 0;
  CHECK_STATUS(mc_model_load(model_dir, &mp, &model), MC_ERR_INVALID_ARGUMENT);
  mp = mc_model_default_params();
  mp.eos_id = 40000;
  CHECK_STATUS(mc_model_load(model_dir, &mp, &model), MC_ERR_INVALID_ARGUMENT);
  mp = mc_model_default_params();
  CHECK_STATUS(mc_model_load(missing_dir, &mp, &model), MC_ERR_NOT_FOUND);
  CHECK_STATUS(mc_model_load(broken_dir, &mp, &model), MC_ERR_CHECKPOINT);
  CHECK(model == NULL);
  model = load(model_dir);

  /* The config. */
  CHECK_STATUS(mc_model_get_config(NULL, &config), MC_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(mc_model_get_config(model, NULL), MC_ERR_INVALID_ARGUMENT);
  config.struct_size = 1;
  CHECK_STATUS(mc_model_get_config(model, &config), MC_ERR_INVALID_ARGUMENT);
  config.struct_size = sizeof(config);
  OK(mc_model_get_config(model, &config));
  CHECK(config.vocab_size == 32000 && config.eos_id == 2 && config.n_layers == 2 && config.sliding_window == 16);
  CHECK(strcmp(config.device, "cpu") == 0 && strcmp(config.dtype, "float32") == 0 && config.quantization[0] == '\0');

  /* Engines. */
  CHECK_STATUS(mc_engine_create(NULL, &ep, &engine), MC_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(mc_engine_create(model, NULL, &engine), MC_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(mc_engine_create(model, &ep, NULL), MC_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(mc_engine_create((mc_model*)&not_a_handle, &ep, &engine), MC_ERR_INVALID_ARGUMENT);
  ep.struct_size = 0;
  CHECK_STATUS(mc_engine_create(model, &ep, &engine), MC_ERR_INVALID_ARGUMENT);
  ep = mc_engine_default_params();
  ep.num_blocks = -1;
  CHECK_STATUS(mc_engine_create(model, &ep, &engine), MC_ERR_INVALID_ARGUMENT);
  ep = mc_engine_default_params();
  ep.max_num_seqs = 0;
  CHECK_STATUS(mc_engine_create(model, &ep, &engine), MC_ERR_INVALID_ARGUMENT);
  ep = mc_engine_default_params();
  ep.max_num_batched_tokens = 1 << 20; /* beyond the model's max_step_tokens */
  CHECK_STATUS(mc_engine_create(model, &ep, &engine), MC_ERR_INVALID_ARGUMENT);
  CHECK(engine == NULL);
  engine = engine_on(model, 0);
  CHECK_STATUS(mc_engine_create(model, &ep, &second), MC_ERR_INVALID_ARGUMENT); /* model in use */
  CHECK(second == NULL);

  /* A step with nothing to do. */
  OK(mc_engine_step(engine, &unfinished));
  CHECK(unfinished == 0);
  OK(mc_engine_step(engine, NULL));
  CHECK_STATUS(mc_engine_step(NULL, &unfinished), MC_ERR_INVALID_ARGUMENT);

  /* Requests: arguments. */
  sp = greedy(4, true);
  CHECK_STATUS(mc_request_add(NULL, prompt, 3, &sp, &id), MC_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(mc_request_add(engine, NULL, 3, &sp, &id), MC_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(mc_request_add(engine, prompt, 0, &sp, &id), MC_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(mc_request_add(engine, prompt, 3, NULL, &id), MC_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(mc_request_add(engine, prompt, 3, &sp, NULL), MC_ERR_INVALID_ARGUMENT);
  ids[0] = 1; ids[1] = -1;
  CHECK_STATUS(mc_request_add(engine, ids, 2, &sp, &id), MC_ERR_INVALID_ARGUMENT);
  ids[1] = 32000;
  CHECK_STATUS(mc_request_add(engine, ids, 2, &sp, &id), MC_ERR_INVALID_ARGUMENT);

  /* Requests: sampling params. */
  sp = greedy(4, true); sp.struct_size = sizeof(sp) + 4; check_bad_sampling(engine, &sp);
  sp = greedy(4, true); sp.temperature = -0.5f; check_bad_sampling(engine, &sp);
  sp = greedy(4, true); sp.temperature = (float)NAN; check_bad_sampling(engine, &sp);
  sp = greedy(4, true); sp.temperature = (float)INFINITY; check_bad_sampling(engine, &sp);
  sp = greedy(4, true); sp.top_p = 0.0f; check_bad_sampling(engine, &sp);
  sp = greedy(4, true); sp.top_p = 1.5f; check_bad_sampling(engine, &sp);
  sp = greedy(4, true); sp.top_k = -2; check_bad_sampling(engine, &sp);
  sp = greedy(4, true); sp.min_p = 1.5f; check_bad_sampling(engine, &sp);
  sp = greedy(4, true); sp.max_tokens = 0; check_bad_sampling(engine, &sp);
  sp = greedy(4, true); sp.min_tokens = 5; check_bad_sampling(engine, &sp);
  sp = greedy(4, true); sp.min_tokens = -1; check_bad_sampling(engine, &sp);
  sp = greedy(4, true); sp.repetition_penalty = 0.0f; check_bad_sampling(engine, &sp);
  sp = greedy(4, true); sp.presence_penalty = 2.5f; check_bad_sampling(engine, &sp);
  sp = greedy(4, true); sp.frequency_penalty = -3.0f; check_bad_sampling(engine, &sp);
  sp = greedy(4, true); sp.logprobs = MC_MAX_LOGPROBS + 1; check_bad_sampling(engine, &sp);
  sp = greedy(4, true); sp.logprobs = -2; check_bad_sampling(engine, &sp);
  sp = greedy(4, true); sp.n_stop_token_ids = 1; check_bad_sampling(engine, &sp);
  sp = greedy(4, true); ids[0] = 32000; sp.stop_token_ids = ids; sp.n_stop_token_ids = 1; check_bad_sampling(engine, &sp);
  sp = greedy(4, true); ids[0] = -3; sp.stop_token_ids = ids; sp.n_stop_token_ids = 1; check_bad_sampling(engine, &sp);
  sp = greedy(4, true); sp.n_logit_bias = 1; check_bad_sampling(engine, &sp);
  sp = greedy(4, true); bias.token = 40000; bias.bias = 1.0f; sp.logit_bias = &bias; sp.n_logit_bias = 1;
  check_bad_sampling(engine, &sp);
  sp = greedy(4, true); bias.token = 5; bias.bias = 200.0f; sp.logit_bias = &bias; sp.n_logit_bias = 1;
  check_bad_sampling(engine, &sp);
  OK(mc_engine_step(engine, &unfinished));
  CHECK(unfinished == 0); /* nothing was queued by the refused requests */

  /* Reading, cancelling, releasing. */
  CHECK_STATUS(mc_request_read(engine, 777, tokens, 8, &n, &finished), MC_ERR_NOT_FOUND);
  CHECK_STATUS(mc_request_cancel(engine, 777), MC_ERR_NOT_FOUND);
  CHECK_STATUS(mc_request_release(engine, 777), MC_ERR_NOT_FOUND);
  info.struct_size = sizeof(info);
  CHECK_STATUS(mc_request_get_info(engine, 777, &info), MC_ERR_NOT_FOUND);
  sp = greedy(4, true);
  sp.logprobs = -1;
  OK(mc_request_add(engine, prompt, 3, &sp, &id));
  CHECK_STATUS(mc_request_read(NULL, id, tokens, 8, &n, &finished), MC_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(mc_request_read(engine, id, NULL, 8, &n, &finished), MC_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(mc_request_read(engine, id, tokens, 8, NULL, &finished), MC_ERR_INVALID_ARGUMENT);
  OK(mc_request_read(engine, id, NULL, 0, &n, NULL));
  CHECK(n == 0);
  CHECK_STATUS(mc_request_read_logprobs(engine, id, logprobs, 8, &n), MC_ERR_INVALID_ARGUMENT); /* logprobs -1 */
  info.struct_size = sizeof(info) * 2;
  CHECK_STATUS(mc_request_get_info(engine, id, &info), MC_ERR_INVALID_ARGUMENT);
  run_to_end(engine);
  OK(mc_request_read(engine, id, tokens, 8, &n, &finished));
  CHECK(n == 4 && finished == 1);
  OK(mc_request_read(engine, id, tokens, 2, &n, &finished)); /* repeatable, capacity-bounded */
  CHECK(n == 2);
  OK(mc_request_release(engine, id));

  sp = greedy(3, true);
  sp.logprobs = 3;
  OK(mc_request_add(engine, prompt, 3, &sp, &id));
  run_to_end(engine);
  CHECK_STATUS(mc_request_read_top_logprobs(engine, id, 3, ids, logprobs, 4, &n), MC_ERR_INVALID_ARGUMENT);
  OK(mc_request_read_top_logprobs(engine, id, 0, ids, logprobs, 4, &n));
  OK(mc_request_read(engine, id, tokens, 8, &n, &finished));
  CHECK(n == 3);
  OK(mc_request_read_top_logprobs(engine, id, 0, ids, logprobs, 4, &n));
  CHECK(n == 3 && ids[0] == tokens[0] && logprobs[0] >= logprobs[1] && logprobs[1] >= logprobs[2] && logprobs[0] <= 0);
  OK(mc_request_release(engine, id));

  /* The model outlives its handle while an engine runs on it. */
  mc_model_free(model);
  mc_model_free(model); /* a second free is refused quietly */
  CHECK_STATUS(mc_model_get_config(model, &config), MC_ERR_INVALID_ARGUMENT); /* freed handle */
  sp = greedy(2, true);
  OK(mc_request_add(engine, prompt, 3, &sp, &id));
  run_to_end(engine);
  mc_engine_free(engine);
  mc_engine_free(engine);
  CHECK_STATUS(mc_engine_step(engine, &unfinished), MC_ERR_INVALID_ARGUMENT); /* freed handle */
  CHECK_STATUS(mc_request_read(engine, id, tokens, 8, &n, &finished), MC_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(mc_engine_step((mc_engine*)&not_a_handle, &unfinished), MC_ERR_INVALID_ARGUMENT);
  mc_engine_free((mc_engine*)&not_a_handle);
  mc_model_free((mc_model*)&not_a_handle);
  mc_engine_free(NULL);
  mc_model_free(NULL);

  /* Cache full: one 16-token block (the sliding window of 16 needs a ring of 2 beyond that). */
  model = load(model_dir);
  engine = engine_on(model, 1);
  sp = greedy(4, true);
  OK(mc_request_add(engine, prompt, 3, &sp, &id)); /* 7 tokens fit one block */
  sp = greedy(20, true);
  CHECK_STATUS(mc_request_add(engine, prompt, 3, &sp, &id), MC_ERR_CACHE_FULL);
  run_to_end(engine);
  mc_engine_free(engine);
  /* The model backs a new engine once the old one is gone. */
  engine = engine_on(model, 0);
  mc_engine_free(engine);
  mc_model_free(model);

  /* A prompt with no room to generate within max_seq_len (full attention, 32 positions). */
  other = load(full_attention_dir);
  engine = engine_on(other, 0);
  for (i = 0; i < 40; ++i) long_prompt[i] = i + 1;
  sp = greedy(4, true);
  CHECK_STATUS(mc_request_add(engine, long_prompt, 32, &sp, &id), MC_ERR_INVALID_ARGUMENT);
  OK(mc_request_add(engine, long_prompt, 30, &sp, &id));
  run_to_end(engine);
  info.struct_size = sizeof(info);
  OK(mc_request_get_info(engine, id, &info));
  CHECK(info.finish_reason == MC_FINISH_LENGTH && info.n_generated == 2); /* cut at max_seq_len */
  mc_engine_free(engine);
  mc_model_free(other);

  printf("errors: ok (%d checks)\n", n_checks);
  return 0;
}

int main(int argc, char** argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc >= 6 && strcmp(argv[1], "generate") == 0) return mode_generate(argc, argv);
  if (argc == 4 && strcmp(argv[1], "cancel") == 0) return mode_cancel(argv);
  if (argc == 5 && strcmp(argv[1], "threads") == 0) return mode_threads(argv);
  if (argc == 3 && strcmp(argv[1], "progress") == 0) return mode_progress(argv);
  if (argc == 6 && strcmp(argv[1], "errors") == 0) return mode_errors(argv);
  fprintf(stderr, "usage: see the top of tests/capi/test_capi.c\n");
  return 2;
}
