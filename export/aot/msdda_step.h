/*
 * libmsdda_step: msdda's fused composed denoising step as a stable C ABI.
 *
 * One call launches the SAME Triton kernel the Python runtime uses (msdda.kernels.fused_step.fused_step_kernel),
 * compiled ahead of time for sm_80 (all compute capability 8.x GPUs) and sm_90, on a caller-given CUDA stream:
 * classifier-free guidance, x0 prediction and clipping, each expert's Gaussian, the K-way product of Gaussians with
 * exponents c_k, the noise draw (given, or Philox keyed by a per-sample seed and a step offset, bit-identical to
 * the Python runtime) and the store of x_prev. It never synchronises.
 *
 * The library links no CUDA library: it dlopen()s libcuda.so.1 on first use, so it loads (and reports
 * MSDDA_STEP_ERR_NO_DRIVER) on machines without a GPU. It uses the CUDA context current on the calling thread
 * (the one PyTorch or the caller made current).
 *
 * Memory layout (all float32, C-contiguous, device pointers):
 *   raw      [K, B, C_out, S]  or, with cfg != 0, [K, 2, B, C_out, S] (index 0 unconditional, 1 conditional);
 *            C_out = C (fixed variance) or 2C (learned variance: channels C..2C are the variance channel)
 *   x_t      [B, C, S]         S = prod of the spatial sizes ("spatial")
 *   coeff    [B, K] (coeff_per_sample != 0) or [K]
 *   noise    [B, C, S]         when noise_mode == MSDDA_NOISE_GIVEN
 *   seeds    int64 [B]         when noise_mode == MSDDA_NOISE_PHILOX
 *   x_prev   [B, C, S]         output (must not alias raw)
 *   error_count int32 [1]      incremented by the number of bad elements (precision <= 0 or non-finite)
 *
 * Versioning: MSDDA_STEP_VERSION_MAJOR changes break the ABI; minor versions only append to msdda_step_args
 * (callers set struct_size = sizeof(msdda_step_args), so an older caller keeps working with a newer library)
 * or change results without changing the ABI:
 *   1.1: the Philox noise draws four normals per counter, tl.randn4x-style (element e takes normal e % 4 of the
 *        counter (e / 4, seed_offset, 0, 0)), as the Python runtime's noise does (ARCHITECTURE.md section 3); 1.0
 *        drew one per element. The same seed gives another (equally distributed) noise than 1.0.
 */
#ifndef MSDDA_STEP_H
#define MSDDA_STEP_H

#include <stdint.h>

#define MSDDA_STEP_VERSION_MAJOR 1
#define MSDDA_STEP_VERSION_MINOR 1
#define MSDDA_STEP_VERSION_PATCH 0
#define MSDDA_STEP_VERSION (MSDDA_STEP_VERSION_MAJOR * 10000 + MSDDA_STEP_VERSION_MINOR * 100 + MSDDA_STEP_VERSION_PATCH)

#if defined(_WIN32)
#define MSDDA_STEP_API __declspec(dllexport)
#else
#define MSDDA_STEP_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum msdda_step_status {
    MSDDA_STEP_OK = 0,
    MSDDA_STEP_ERR_INVALID_ARGUMENT = 1, /* a null/misaligned pointer, a bad size or mode */
    MSDDA_STEP_ERR_NO_DRIVER = 2,        /* libcuda.so.1 could not be loaded (no NVIDIA driver) */
    MSDDA_STEP_ERR_NO_DEVICE = 3,        /* the driver loaded but cuInit found no GPU */
    MSDDA_STEP_ERR_NO_CONTEXT = 4,       /* no CUDA context is current on the calling thread */
    MSDDA_STEP_ERR_UNSUPPORTED_ARCH = 5, /* the current GPU is not sm_8x / sm_90 (or was not compiled in) */
    MSDDA_STEP_ERR_CUDA = 6,             /* a driver call failed: msdda_step_last_cuda_error() tells which code */
    MSDDA_STEP_ERR_ABI = 7               /* struct_size is smaller than version 1.0's struct */
} msdda_step_status;

typedef enum msdda_var_mode {
    MSDDA_VAR_FIXED = 0,         /* var = var_fixed (0: the zero-variance limit, e.g. DDIM eta = 0) */
    MSDDA_VAR_LEARNED_RANGE = 1, /* log var = frac lv_max + (1 - frac) lv_min, frac = (v + 1) / 2 */
    MSDDA_VAR_LEARNED = 2        /* var = v, the variance channel itself */
} msdda_var_mode;

typedef enum msdda_noise_mode {
    MSDDA_NOISE_GIVEN = 1,  /* z read from args.noise */
    MSDDA_NOISE_PHILOX = 2  /* z = normal (element % 4) of Philox4x32-10, key = seeds[b],
                               counter = (element / 4, seed_offset, 0, 0) (tl.randn4x) */
} msdda_noise_mode;

/* One step's scalars (msdda.kernels.StepScalars, with var_fixed = exp(log_var_fixed)). */
typedef struct msdda_step_scalars {
    float px, po;           /* x0 = px * x_t + po * out */
    float mx, m0, mo;       /* mu = mx * x_t + m0 * clamp(x0, -clip, clip) + mo * out */
    float clip;             /* INFINITY: no clipping */
    float var_fixed;        /* MSDDA_VAR_FIXED's variance */
    float lv_min, lv_max;   /* MSDDA_VAR_LEARNED_RANGE's log-variance range */
    int32_t var_mode;       /* msdda_var_mode */
} msdda_step_scalars;

typedef struct msdda_step_args {
    uint32_t struct_size;   /* sizeof(msdda_step_args) as the caller compiled it */
    uint32_t reserved0;
    uint64_t raw, x_t, coeff, noise, seeds, x_prev, error_count; /* CUdeviceptr values, see the layout above */
    int32_t K;              /* experts, >= 1 */
    int32_t B;              /* samples, >= 1 */
    int32_t C;              /* channels of x_t */
    int32_t C_out;          /* channels of raw: C or 2C */
    int64_t spatial;        /* elements per channel (H * W); C_out * spatial < 2^31 */
    int32_t cfg;            /* nonzero: raw has the guidance axis */
    float guidance_scale;   /* out = u + g (c - u) when cfg */
    int32_t coeff_per_sample; /* nonzero: coeff is [B, K]; zero: [K] */
    int32_t noise_mode;     /* msdda_noise_mode */
    uint64_t seed_offset;   /* Philox step offset, < 2^32 (the runtime uses 1 + step index) */
    msdda_step_scalars scalars;
} msdda_step_args;

/* MSDDA_STEP_VERSION of the loaded library (compare with the header's to detect a mismatch). */
MSDDA_STEP_API uint32_t msdda_step_version(void);

/* Load the driver and cuInit (idempotent, thread-safe). MSDDA_STEP_OK, _ERR_NO_DRIVER or _ERR_NO_DEVICE. */
MSDDA_STEP_API int msdda_step_init(void);

/* Enqueue one fused step on `stream` (a CUstream; NULL = the legacy default stream) in the current context.
 * Returns MSDDA_STEP_OK once the launch is enqueued; errors are reported before anything is enqueued. */
MSDDA_STEP_API int msdda_step_launch(const msdda_step_args *args, void *stream);

/* The compute capabilities compiled in (e.g. 80, 90): writes up to `max` into `archs`, returns how many exist. */
MSDDA_STEP_API int msdda_step_compiled_archs(int *archs, int max);

/* A static English description of a status code. */
MSDDA_STEP_API const char *msdda_step_status_string(int status);

/* The CUresult of the last failing driver call on this thread (0 if none). */
MSDDA_STEP_API int msdda_step_last_cuda_error(void);

/* Triton version the cubins were compiled with. */
MSDDA_STEP_API const char *msdda_step_triton_version(void);

#ifdef __cplusplus
}
#endif

#endif /* MSDDA_STEP_H */
