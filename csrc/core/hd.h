// MC_HD marks helpers compiled for both the host (CPU backend) and the device (CUDA kernels),
// so index math is written once.
#pragma once

#ifdef __CUDACC__
#define MC_HD __host__ __device__
#else
#define MC_HD
#endif
