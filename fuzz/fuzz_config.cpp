// Both config readers on arbitrary JSON, then the weight plan of any config they accept (the
// plan is sized by the config, so an unbounded field shows up here as a memory blow-up).
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/checkpoint.h"
#include "core/config.h"
#include "core/error.h"
#include "core/json.h"
#include "core/kv_layout.h"

namespace {

void plan(const mc::ModelConfig& config) {
  mc::ModelWeights weights;
  volatile size_t slots = mc::weight_slots(config, weights).size();
  volatile int32_t ring = mc::KvLayout::make(16, config.sliding_window.value_or(0)).ring_blocks;
  (void)slots;
  (void)ring;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  mc::Json json;
  try {
    json = mc::Json::parse(std::string(reinterpret_cast<const char*>(data), size));
  } catch (const mc::Error&) {
    return 0;
  }
  try {
    plan(mc::ModelConfig::from_hf_json(json, "config.json"));
  } catch (const mc::Error&) {
  }
  try {
    plan(mc::ModelConfig::from_mistral_json(json, "params.json"));
  } catch (const mc::Error&) {
  }
  return 0;
}
