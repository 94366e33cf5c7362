// The safetensors reader on arbitrary files. Input: [flags][file bytes]; flags bit 0 set =
// read into private memory instead of mmap. Every float tensor that opens is read in full.
#include <cstddef>
#include <cstdint>

#include "core/error.h"
#include "core/safetensors.h"
#include "fuzz_files.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const bool copy = (data[0] & 1) != 0;
  const std::string path = mc_fuzz::scratch_dir() + "/model.safetensors";
  mc_fuzz::write_file(path, data + 1, size - 1);
  try {
    auto file = mc::SafetensorsFile::open(path);
    volatile float sum = 0;
    for (const auto& [name, entry] : file->entries()) {
      if (!entry.dtype) continue;
      if (copy) {  // the pread path the loader copies tensors with
        mc::Tensor tensor = mc::Tensor::empty(*entry.dtype, entry.shape);
        file->read_into(entry, tensor.data);
        sum = sum + mc_fuzz::touch(tensor);
      } else {
        sum = sum + mc_fuzz::touch(file->view(entry));
      }
    }
  } catch (const mc::Error&) {
  }
  return 0;
}
