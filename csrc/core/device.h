// Whether a CUDA device can be used by this build. Never fails: a build without CUDA, a
// machine without a driver, or a driver without a GPU all report 0 devices.
#pragma once

namespace mc {

int cuda_device_count();
bool cuda_compiled();

}  // namespace mc
