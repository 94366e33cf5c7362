// The JSON reader on arbitrary bytes: a value or an mc::Error, nothing else.
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/error.h"
#include "core/json.h"

namespace {

// Visits every value through the typed accessors, as the config readers do.
size_t walk(const mc::Json& value) {
  switch (value.type()) {
    case mc::Json::Type::kArray: {
      size_t n = 1;
      for (const mc::Json& item : value.array("array")) n += walk(item);
      return n;
    }
    case mc::Json::Type::kObject: {
      size_t n = 1;
      for (const auto& [key, item] : value.object("object")) n += key.size() + walk(item);
      return n;
    }
    case mc::Json::Type::kNumber:
      try {
        return static_cast<size_t>(value.integer("number") & 1);
      } catch (const mc::Error&) {
        return 1;
      }
    case mc::Json::Type::kString: return value.string("string").size();
    default: return 1;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    volatile size_t visited = walk(mc::Json::parse(std::string(reinterpret_cast<const char*>(data), size)));
    (void)visited;
  } catch (const mc::Error&) {
  }
  return 0;
}
