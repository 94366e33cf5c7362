/* mistral_cuda.h: the C API of the mistral_cuda engine core, for embedding it in other services.
 *
 * Plain C (C99 and C++): opaque handles, parameter structs returned by value from
 * *_default_params() and passed by pointer, create/free pairs, and a status from every fallible
 * call. No C++ type or exception crosses this header. On an error a call returns a status other
 * than MC_OK, changes none of its outputs and leaves a message for the calling thread in
 * mc_last_error().
 *
 * Typical use (error checks left out):
 *
 *   mc_model_params mp = mc_model_default_params();       // .device = "cpu" | "cuda" | "auto"
 *   mc_model* model;   mc_model_load("/models/mistral-7b", &mp, &model);
 *   mc_engine_params ep = mc_engine_default_params();
 *   mc_engine* engine; mc_engine_create(model, &ep, &engine);
 *   mc_sampling_params sp = mc_sampling_default_params();  sp.temperature = 0;  // greedy
 *   uint64_t id;       mc_request_add(engine, prompt_ids, n_prompt, &sp, &id);
 *   size_t unfinished = 1;
 *   while (unfinished > 0) mc_engine_step(engine, &unfinished);   // one token per request and step
 *   mc_request_read(engine, id, tokens, capacity, &n_read, &finished);
 *   mc_request_release(engine, id);
 *   mc_engine_free(engine);  mc_model_free(model);
 *
 * Threading contract
 *   - Every call on one engine is thread-safe: the engine's mutex serializes them. One thread
 *     may step while others add, read, cancel and release; a call made during a step waits for
 *     that step (one forward pass over the batch) to end.
 *   - Engines are independent of each other. A model backs at most one engine at a time (the
 *     engine owns the model's KV cache); mc_engine_create on a model in use fails.
 *   - mc_last_error() is per thread: it describes the last failed call made by that thread.
 *   - Freeing a handle while another thread is still inside a call on it is the caller's error.
 *     A handle that was already freed, or never created, is detected and refused
 *     (MC_ERR_INVALID_ARGUMENT) unless its address has been reused by a new handle.
 *
 * Request lifetime
 *   mc_request_add queues a request and returns its id (ids count up from 1, never reused in
 *   one engine). mc_engine_step gives every running request at most one new token. A finished
 *   request (stopped, at max_tokens, or cancelled) stays readable until mc_request_release
 *   forgets it or the engine is freed: release every request you add, or an engine serving
 *   forever grows by the generated tokens of every request.
 *
 * ABI evolution
 *   Every params struct starts with `size_t struct_size`, set by its *_default_params()
 *   function (output structs: set by the caller to sizeof the struct). A call given another
 *   size returns MC_ERR_INVALID_ARGUMENT; later versions will accept the sizes of earlier ones.
 *   Always start from the defaults and change fields, never build a params struct from zero.
 */
#ifndef MISTRAL_CUDA_H
#define MISTRAL_CUDA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MC_VERSION_MAJOR 0
#define MC_VERSION_MINOR 1
#define MC_VERSION_PATCH 0
#define MC_VERSION_STRING "0.1.0"

#if defined(_WIN32)
#define MC_API
#else
#define MC_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---- status, errors, version ---- */

typedef enum mc_status {
  MC_OK = 0,
  MC_ERR_INVALID_ARGUMENT, /* a NULL, a bad handle, size, id, token id or parameter value */
  MC_ERR_NOT_FOUND,        /* a model directory that does not exist; an unknown request id */
  MC_ERR_CHECKPOINT,       /* a model directory, config or weight file that is wrong */
  MC_ERR_UNSUPPORTED,      /* valid input this build cannot serve (e.g. "cuda" without CUDA) */
  MC_ERR_CACHE_FULL,       /* the KV cache cannot hold the request, even alone */
  MC_ERR_CANCELLED,        /* the model load was cancelled by its progress callback */
  MC_ERR_INTERNAL          /* anything else (out of memory, a device error, a bug) */
} mc_status;

/* The enumerator's name, e.g. "MC_ERR_NOT_FOUND"; "unknown status" for other values. Static. */
MC_API const char* mc_status_str(mc_status status);

/* The message of the calling thread's last failed call ("" if none failed yet). Valid until
 * that thread's next failing call; copy it to keep it. */
MC_API const char* mc_last_error(void);

/* The library's version, MC_VERSION_STRING of the build ("0.1.0"). Static. */
MC_API const char* mc_version(void);

/* ---- models ---- */

typedef struct mc_model mc_model;

/* Called while weights load; return true to go on, false to cancel the load (mc_model_load then
 * returns MC_ERR_CANCELLED). Called on the loading thread. */
typedef bool (*mc_progress_callback)(int64_t done_bytes, int64_t total_bytes, void* user_data);

typedef struct mc_model_params {
  size_t struct_size;
  const char* device;        /* "cpu" (default) | "cuda" | "auto" (CUDA when a GPU is usable) */
  const char* dtype;         /* NULL: the checkpoint's on the CPU, "bfloat16" on CUDA; or "float32",
                                "bfloat16", "float16" (CUDA: the half dtypes only) */
  const char* quantization;  /* NULL: weights as stored; "int8" | "int4" quantize the layer
                                matrices on load */
  int32_t block_size;        /* tokens per KV-cache block: 16 */
  int32_t max_step_tokens;   /* tokens of one forward pass, 0 = 2048; bounds max_num_batched_tokens */
  int32_t max_step_seqs;     /* sequences of one forward pass, 0 = 256; bounds max_num_seqs */
  bool use_mmap;             /* true: map the weight files (they must not change while loaded) */
  int32_t eos_id;            /* -1 (default): "eos_token_id" of config.json or generation_config.json,
                                none when neither has one; else this id */
  mc_progress_callback progress;  /* NULL: none */
  void* progress_user_data;
} mc_model_params;

MC_API mc_model_params mc_model_default_params(void);

/* Loads a model directory (Hugging Face: config.json + *.safetensors; Mistral: params.json +
 * consolidated.safetensors; AWQ/GPTQ int4 checkpoints). On MC_OK *out is a new model the caller
 * frees with mc_model_free. Statuses: MC_ERR_INVALID_ARGUMENT (NULLs, bad params),
 * MC_ERR_NOT_FOUND (no such directory), MC_ERR_CHECKPOINT (a broken or inconsistent
 * checkpoint), MC_ERR_UNSUPPORTED (e.g. device "cuda" in a build without CUDA),
 * MC_ERR_CANCELLED (the progress callback said stop), MC_ERR_INTERNAL. */
MC_API mc_status mc_model_load(const char* model_dir, const mc_model_params* params, mc_model** out);

/* Releases the caller's model handle. An engine created on it keeps the model alive until
 * mc_engine_free. NULL is ignored. */
MC_API void mc_model_free(mc_model* model);

typedef struct mc_model_config {
  size_t struct_size;      /* set by the caller: sizeof(mc_model_config) */
  int64_t dim;             /* residual width */
  int64_t n_layers;
  int64_t n_heads;         /* query heads */
  int64_t n_kv_heads;      /* key/value heads */
  int64_t head_dim;
  int64_t hidden_dim;      /* FFN width (per expert for MoE) */
  int64_t vocab_size;      /* token ids are 0 .. vocab_size - 1 */
  int64_t max_seq_len;     /* positions of full attention */
  int64_t sliding_window;  /* 0: full attention */
  int64_t n_experts;       /* 0: dense FFN */
  int64_t n_experts_per_tok;
  double norm_eps;
  double rope_theta;
  int32_t eos_id;          /* -1: none */
  int32_t block_size;      /* tokens per KV-cache block */
  char device[16];         /* "cpu" | "cuda" (resolved) */
  char dtype[16];          /* of the float weight matrices: "float32", "bfloat16", "float16" */
  char quantization[16];   /* "" (float), "int8", "int4", "awq", "gptq" */
} mc_model_config;

/* Fills *out with the model's hyper-parameters. Statuses: MC_ERR_INVALID_ARGUMENT. */
MC_API mc_status mc_model_get_config(const mc_model* model, mc_model_config* out);

/* ---- engines: continuous batching over one model ---- */

typedef struct mc_engine mc_engine;

typedef struct mc_engine_params {
  size_t struct_size;
  int32_t max_num_seqs;            /* running requests at once: 64 (at most the model's max_step_seqs) */
  int32_t max_num_batched_tokens;  /* tokens of one step (decode tokens + prompt chunks): 2048
                                      (at most the model's max_step_tokens) */
  int64_t num_blocks;              /* KV-cache blocks: 0 = enough for four full-length sequences
                                      (capped near 8 GiB of K/V); the cache is allocated here */
} mc_engine_params;

MC_API mc_engine_params mc_engine_default_params(void);

/* An engine on `model`, which must not back another live engine; allocates the KV cache.
 * On MC_OK *out is a new engine the caller frees with mc_engine_free. Statuses:
 * MC_ERR_INVALID_ARGUMENT (NULLs, bad params, a model in use), MC_ERR_INTERNAL (out of memory). */
MC_API mc_status mc_engine_create(mc_model* model, const mc_engine_params* params, mc_engine** out);

/* Frees the engine, its requests and its KV cache; the model may then back a new engine.
 * NULL is ignored. */
MC_API void mc_engine_free(mc_engine* engine);

/* One iteration: every running request gets one token, then what is left of the token budget
 * goes to prompt chunks of waiting requests; requests reaching a stop condition finish. When
 * the cache runs out of blocks the most recently admitted request is preempted and recomputed
 * later (its tokens do not change). *n_unfinished (may be NULL) gets the number of requests
 * still running or waiting. A step with nothing to do returns MC_OK at once.
 * Statuses: MC_ERR_INVALID_ARGUMENT (a bad handle), MC_ERR_INTERNAL. */
MC_API mc_status mc_engine_step(mc_engine* engine, size_t* n_unfinished);

/* ---- requests ---- */

#define MC_SEED_RANDOM UINT64_MAX /* mc_sampling_params.seed: a fresh seed per request */
#define MC_MAX_LOGPROBS 20

typedef struct mc_logit_bias {
  int32_t token;  /* 0 .. vocab_size - 1 */
  float bias;     /* added to the token's logit, in [-100, 100] */
} mc_logit_bias;

/* vLLM's names and semantics. Applied in this order: logit_bias and the min_tokens mask (EOS and
 * stop ids masked until min_tokens tokens exist), penalties, temperature, then min_p, top_k and
 * top_p in sequence. */
typedef struct mc_sampling_params {
  size_t struct_size;
  int32_t max_tokens;           /* >= 1: 64 */
  int32_t min_tokens;           /* 0 .. max_tokens: 0 */
  float temperature;            /* finite, >= 0; 0 = greedy: 1 */
  int32_t top_k;                /* >= -1; 0 or -1 = off: 0 */
  float top_p;                  /* (0, 1]; 1 = off */
  float min_p;                  /* [0, 1]; 0 = off */
  float repetition_penalty;     /* finite, > 0; 1 = off */
  float presence_penalty;       /* [-2, 2]: 0 */
  float frequency_penalty;      /* [-2, 2]: 0 */
  uint64_t seed;                /* MC_SEED_RANDOM (default) or a seed: a seeded request's tokens
                                   depend on neither the batch nor preemptions */
  const int32_t* stop_token_ids;  /* n_stop_token_ids ids that end the request (copied) */
  size_t n_stop_token_ids;
  const mc_logit_bias* logit_bias;  /* n_logit_bias entries (copied) */
  size_t n_logit_bias;
  int32_t logprobs;             /* -1: none; 0: each generated token's log-probability (default);
                                   k <= MC_MAX_LOGPROBS: also the k most likely tokens per step */
  bool ignore_eos;              /* false: the model's EOS id ends the request */
} mc_sampling_params;

MC_API mc_sampling_params mc_sampling_default_params(void);

/* Queues a request for prompt[0 .. n_prompt) (token ids, copied; the caller applies any chat
 * template and the BOS token). *id gets its id. Statuses: MC_ERR_INVALID_ARGUMENT (NULLs, an
 * empty prompt, a token id outside the vocabulary, a prompt with no room to generate within
 * max_seq_len, bad sampling params), MC_ERR_CACHE_FULL (prompt + max_tokens cannot fit the KV
 * cache even alone: shorten it or create the engine with more num_blocks), MC_ERR_INTERNAL. */
MC_API mc_status mc_request_add(mc_engine* engine, const int32_t* prompt, size_t n_prompt,
                                const mc_sampling_params* params, uint64_t* id);

/* Copies the request's generated tokens from the first, at most `capacity` of them, into
 * tokens[] (NULL allowed when capacity is 0); *n_read gets the number copied, *finished
 * (may be NULL) 1 once the request will get no more tokens (a cancelled request reads as
 * finished), else 0. Reading is repeatable: tokens already read are copied again.
 * Statuses: MC_ERR_INVALID_ARGUMENT, MC_ERR_NOT_FOUND (an id never added or already released). */
MC_API mc_status mc_request_read(mc_engine* engine, uint64_t id, int32_t* tokens, size_t capacity,
                                 size_t* n_read, int* finished);

/* Why a request finished: */
typedef enum mc_finish_reason {
  MC_FINISH_NONE = 0, /* not finished */
  MC_FINISH_STOP,     /* it sampled EOS or a stop token id (the token is the last generated one) */
  MC_FINISH_LENGTH,   /* max_tokens reached, or max_seq_len under full attention */
  MC_FINISH_ABORT     /* cancelled with mc_request_cancel */
} mc_finish_reason;

/* "none", "stop", "length", "abort" (the OpenAI API's names); "unknown" otherwise. Static. */
MC_API const char* mc_finish_reason_str(mc_finish_reason reason);

typedef struct mc_request_info {
  size_t struct_size;            /* set by the caller: sizeof(mc_request_info) */
  size_t n_prompt;               /* prompt tokens */
  size_t n_generated;            /* tokens generated so far */
  int finished;                  /* 1 once no more tokens will come */
  mc_finish_reason finish_reason;
  int32_t stop_token;            /* the EOS / stop id that finished it, else -1 */
} mc_request_info;

/* Fills *out with the request's state. Statuses: MC_ERR_INVALID_ARGUMENT, MC_ERR_NOT_FOUND. */
MC_API mc_status mc_request_get_info(mc_engine* engine, uint64_t id, mc_request_info* out);

/* The log-probabilities (natural log, raw model distribution) of the request's generated tokens
 * from the first, at most `capacity`, into logprobs[]; *n_read gets the number copied. Statuses:
 * MC_ERR_INVALID_ARGUMENT (also: the request was added with logprobs = -1), MC_ERR_NOT_FOUND. */
MC_API mc_status mc_request_read_logprobs(mc_engine* engine, uint64_t id, float* logprobs, size_t capacity,
                                          size_t* n_read);

/* The most likely tokens at the step that produced generated token `index`, most likely first,
 * at most `capacity` (and at most the request's logprobs count): ids[] and their logprobs[].
 * Statuses: MC_ERR_INVALID_ARGUMENT (also: index >= tokens generated), MC_ERR_NOT_FOUND. */
MC_API mc_status mc_request_read_top_logprobs(mc_engine* engine, uint64_t id, size_t index, int32_t* ids,
                                              float* logprobs, size_t capacity, size_t* n_read);

/* Stops the request now and frees its KV blocks; it reads as finished (MC_FINISH_ABORT) with
 * the tokens generated so far. Cancelling a finished request changes nothing and returns MC_OK.
 * Statuses: MC_ERR_INVALID_ARGUMENT, MC_ERR_NOT_FOUND. */
MC_API mc_status mc_request_cancel(mc_engine* engine, uint64_t id);

/* Forgets the request (cancelling it first if it is unfinished): its id then reads as
 * MC_ERR_NOT_FOUND. Statuses: MC_ERR_INVALID_ARGUMENT, MC_ERR_NOT_FOUND. */
MC_API mc_status mc_request_release(mc_engine* engine, uint64_t id);

#ifdef __cplusplus
}
#endif

#endif /* MISTRAL_CUDA_H */
