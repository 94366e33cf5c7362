// The safetensors reader on arbitrary files. Input: [flags][file bytes]; flags bit 0 set =
// read into private memory instead of mmap. Every float tensor that opens is read in full.
#include <cstddef>
#include <cstdint>

#include "core/error.h"
#include "core/safetensors.h"
#include "fuzz_files.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const bool use_mmap = (data[0] & 1) == 0;
  const std::string path = mc_fuzz::scratch_dir() + "/model.safetensors";
  mc_fuzz::write_file(path, data + 1, size - 1);
  try {
    auto file = mc::SafetensorsFile::open(path, use_mmap);
    volatile float sum = 0;
    for (const auto& [name, entry] : file->entries())
      if (entry.dtype) sum = sum + mc_fuzz::touch(file->view(entry));
  } catch (const mc::Error&) {
  }
  return 0;
}
