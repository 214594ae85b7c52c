/* Internal: the table of ahead-of-time compiled cubins that gen_kernels.py generates. Not part of the ABI. */
#ifndef MSDDA_STEP_KERNELS_H
#define MSDDA_STEP_KERNELS_H
#include <stddef.h>

typedef struct msdda_kernel_variant {
    int arch;                  /* 80 or 90: sm_XY the cubin was built for */
    int var_mode;              /* VAR_MODE constexpr */
    int cfg;                   /* CFG constexpr */
    int noise;                 /* NOISE constexpr (1 given, 2 Philox) */
    int block;                 /* BLOCK constexpr: elements per program */
    int num_warps;             /* threads per block = 32 * num_warps */
    int shared;                /* dynamic shared memory, bytes */
    const char *name;          /* kernel symbol in the cubin */
    const unsigned char *cubin;
    size_t cubin_size;
} msdda_kernel_variant;

extern const msdda_kernel_variant msdda_kernel_variants[];
extern const int msdda_kernel_variant_count;
extern const char msdda_kernel_triton_version[];

#endif
