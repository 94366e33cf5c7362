// Error type of the core. Every failure a caller can cause (bad files, bad requests, a full
// cache) is reported as mc::Error with a kind, so bindings can map it to a precise exception.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace mc {

enum class ErrorKind {
  kInvalidRequest,  // bad arguments to a call: token ids, sequence ids, sizes
  kCheckpoint,      // a model directory, config or safetensors file that is wrong
  kFileNotFound,    // a path that does not exist
  kCacheFull,       // no free KV-cache block left
  kOutOfMemory,     // an allocation failed
  kUnsupported,     // valid input this build cannot serve (e.g. no CUDA backend)
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

template <typename... Parts>
std::string str_cat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}

template <typename... Parts>
[[noreturn]] void fail(ErrorKind kind, Parts&&... parts) {
  throw Error(kind, str_cat(std::forward<Parts>(parts)...));
}

}  // namespace mc
