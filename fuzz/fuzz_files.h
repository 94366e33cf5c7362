// Scratch files for the fuzz targets that read from paths: one private directory per process
// (in /dev/shm when it exists, so the disk is not worn), rewritten by every input.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"

namespace mc_fuzz {

// Removed at a normal exit (libFuzzer exits normally at -max_total_time); a crash leaves it
// behind with the files of the crashing input.
class ScratchDir {
 public:
  ScratchDir() {
    path_ = (access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp") + std::string("/mc_fuzz.XXXXXX");
    if (mkdtemp(path_.data()) == nullptr) std::abort();
  }
  ~ScratchDir() {
    if (DIR* dir = opendir(path_.c_str())) {
      while (const dirent* entry = readdir(dir))
        if (std::string(entry->d_name) != "." && std::string(entry->d_name) != "..")
          unlink((path_ + "/" + entry->d_name).c_str());
      closedir(dir);
    }
    rmdir(path_.c_str());
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

inline const std::string& scratch_dir() {
  static const ScratchDir dir;
  return dir.path();
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
  mc::convert(tensor.data, tensor.dtype, values.data(), mc::DType::kF32, values.size());
  float sum = 0;
  for (float value : values) sum += value;
  return sum;
}

}  // namespace mc_fuzz
