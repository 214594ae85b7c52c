/* Compile-time check (built only when cuda.h is found): the driver values msdda_step.c declares itself equal
 * cuda.h's, so the library can build without the CUDA toolkit and still be right. */
#include <cuda.h>

_Static_assert(CUDA_SUCCESS == 0, "CUDA_SUCCESS");
_Static_assert(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR == 75, "COMPUTE_CAPABILITY_MAJOR");
_Static_assert(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR == 76, "COMPUTE_CAPABILITY_MINOR");
_Static_assert(sizeof(CUdeviceptr) == 8, "CUdeviceptr is 64-bit");
_Static_assert(sizeof(CUdevice) == sizeof(int), "CUdevice is an int");

int msdda_cuda_abi_check(void) { return 0; }
