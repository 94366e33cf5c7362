// Scratch files for the fuzz targets that read from paths: one private directory per process
// (in /dev/shm when it exists, so the disk is not worn), rewritten by every input.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"

namespace mc_fuzz {

inline const std::string& scratch_dir() {
  static const std::string dir = [] {
    std::string pattern = (access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp") + std::string("/mc_fuzz.XXXXXX");
    if (mkdtemp(pattern.data()) == nullptr) std::abort();
    return pattern;
  }();
  return dir;
}

inline void write_file(const std::string& path, const uint8_t* data, size_t size) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) std::abort();
  for (size_t done = 0; done < size;) {
    ssize_t wrote = ::write(fd, data + done, size - done);
    if (wrote <= 0) std::abort();
    done += static_cast<size_t>(wrote);
  }
  ::close(fd);
}

// Reads every element of a float tensor, so a view past its memory or misaligned data is caught.
inline float touch(const mc::Tensor& tensor) {
  std::vector<float> values(static_cast<size_t>(tensor.numel()));
  mc::convert_to_f32(tensor.data, tensor.dtype, values.size(), values.data());
  float sum = 0;
  for (float value : values) sum += value;
  return sum;
}

}  // namespace mc_fuzz
