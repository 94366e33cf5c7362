// The public header compiled as C++ (-Wall -Wextra -Werror -pedantic): the same declarations,
// with C linkage, and every params struct an ordinary standard-layout aggregate.
#include <mistral_cuda.h>

#include <type_traits>

static_assert(std::is_standard_layout<mc_model_params>::value, "C struct");
static_assert(std::is_standard_layout<mc_engine_params>::value, "C struct");
static_assert(std::is_standard_layout<mc_sampling_params>::value, "C struct");
static_assert(std::is_standard_layout<mc_model_config>::value, "C struct");
static_assert(std::is_standard_layout<mc_request_info>::value, "C struct");
static_assert(MC_OK == 0 && MC_ERR_INTERNAL == 7, "status values are part of the ABI");

int main() {
  // C linkage: the functions are callable through plain function pointers of the C types.
  mc_status (*step)(mc_engine*, size_t*) = &mc_engine_step;
  const char* (*version)(void) = &mc_version;
  mc_sampling_params params = mc_sampling_default_params();
  return step != nullptr && version() != nullptr && params.struct_size == sizeof(params) ? 0 : 1;
}
