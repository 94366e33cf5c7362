// The whole checkpoint-directory loader on arbitrary model directories. An input packs one
// directory (fuzz/make_corpus.py writes seeds in this form):
//   [flags u8] bit 0: Mistral layout (params.json + consolidated.safetensors), else Hugging
//              Face; bit 1: HF sharded (model.safetensors.index.json + the one shard it should
//              name); bit 2: copy every tensor (no mmap views); bit 3: convert to float32
//   [u16 LE n][n bytes: config.json or params.json]
//   [u16 LE m][m bytes: the index]   (sharded only)
//   [the rest: the safetensors file]
// Every weight that loads is read in full.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/checkpoint.h"
#include "core/error.h"
#include "fuzz_files.h"

namespace {

constexpr const char* kShard = "model-00001-of-00001.safetensors";

bool take(const uint8_t*& data, size_t& size, size_t& n) {
  if (size < 2) return false;
  n = data[0] | (size_t{data[1]} << 8);
  data += 2;
  size -= 2;
  return n <= size;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t flags = data[0];
  const bool mistral = flags & 1, sharded = !mistral && (flags & 2), use_mmap = !(flags & 4);
  ++data;
  --size;
  const std::string& dir = mc_fuzz::scratch_dir();
  for (const char* name : {"config.json", "params.json", "model.safetensors", "model.safetensors.index.json",
                           "consolidated.safetensors", kShard})
    unlink((dir + "/" + name).c_str());

  size_t n = 0;
  if (!take(data, size, n)) return 0;
  mc_fuzz::write_file(dir + (mistral ? "/params.json" : "/config.json"), data, n);
  data += n;
  size -= n;
  if (sharded) {
    if (!take(data, size, n)) return 0;
    mc_fuzz::write_file(dir + "/model.safetensors.index.json", data, n);
    data += n;
    size -= n;
  }
  const char* weights = mistral ? "consolidated.safetensors" : sharded ? kShard : "model.safetensors";
  mc_fuzz::write_file(dir + "/" + weights, data, size);

  try {
    mc::LoadOptions options;
    options.use_mmap = use_mmap;
    if (flags & 8) options.dtype = mc::DType::kF32;  // the conversion path too
    mc::Checkpoint checkpoint = mc::load_checkpoint(dir, options);
    mc::ModelWeights& w = checkpoint.weights;
    volatile float sum = mc_fuzz::touch(w.tok_embeddings) + mc_fuzz::touch(w.norm) + mc_fuzz::touch(w.output);
    for (const mc::LayerWeights& layer : w.layers)
      for (const mc::Tensor* t : {&layer.attn_norm, &layer.wqkv, &layer.wo, &layer.ffn_norm, &layer.w13, &layer.w2,
                                  &layer.router})
        if (t->defined()) sum = sum + mc_fuzz::touch(*t);
  } catch (const mc::Error&) {
  }
  return 0;
}
