/* libmsdda_step: launcher for the ahead-of-time compiled fused step (see msdda_step.h). */
#define _GNU_SOURCE
#include "msdda_step.h"

#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "msdda_step_kernels.h"

/* The few CUDA driver API types and values used, declared here so the library builds without cuda.h or a
 * libcuda stub (values are the driver ABI's, checked against cuda.h by cuda_abi_check.c when it is present). */
typedef int CUresult;
typedef int CUdevice;
typedef struct CUctx_st *CUcontext;
typedef struct CUmod_st *CUmodule;
typedef struct CUfunc_st *CUfunction;
typedef struct CUstream_st *CUstream;
typedef unsigned long long CUdeviceptr;
#define MSDDA_CUDA_SUCCESS 0
#define MSDDA_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR 75
#define MSDDA_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR 76

typedef CUresult (*cuInit_t)(unsigned int);
typedef CUresult (*cuCtxGetCurrent_t)(CUcontext *);
typedef CUresult (*cuCtxGetDevice_t)(CUdevice *);
typedef CUresult (*cuDeviceGetAttribute_t)(int *, int, CUdevice);
typedef CUresult (*cuModuleLoadData_t)(CUmodule *, const void *);
typedef CUresult (*cuModuleGetFunction_t)(CUfunction *, CUmodule, const char *);
typedef CUresult (*cuLaunchKernel_t)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                     unsigned, CUstream, void **, void **);

static struct {
    void *lib;
    int status;
    cuInit_t cuInit;
    cuCtxGetCurrent_t cuCtxGetCurrent;
    cuCtxGetDevice_t cuCtxGetDevice;
    cuDeviceGetAttribute_t cuDeviceGetAttribute;
    cuModuleLoadData_t cuModuleLoadData;
    cuModuleGetFunction_t cuModuleGetFunction;
    cuLaunchKernel_t cuLaunchKernel;
} drv;

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static __thread int last_cuda_error = 0;

static void load_driver(void) {
    const char *names[] = {"libcuda.so.1", "libcuda.so"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]) && !drv.lib; i++)
        drv.lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (!drv.lib) {
        drv.status = MSDDA_STEP_ERR_NO_DRIVER;
        return;
    }
#define LOAD(sym) drv.sym = (sym##_t)dlsym(drv.lib, #sym)
    LOAD(cuInit);
    LOAD(cuCtxGetCurrent);
    LOAD(cuCtxGetDevice);
    LOAD(cuDeviceGetAttribute);
    LOAD(cuModuleLoadData);
    LOAD(cuModuleGetFunction);
    LOAD(cuLaunchKernel);
#undef LOAD
    if (!drv.cuInit || !drv.cuCtxGetCurrent || !drv.cuCtxGetDevice || !drv.cuDeviceGetAttribute ||
        !drv.cuModuleLoadData || !drv.cuModuleGetFunction || !drv.cuLaunchKernel) {
        drv.status = MSDDA_STEP_ERR_NO_DRIVER;
        return;
    }
    CUresult rc = drv.cuInit(0);
    if (rc != MSDDA_CUDA_SUCCESS) {
        last_cuda_error = rc;
        drv.status = MSDDA_STEP_ERR_NO_DEVICE;
        return;
    }
    drv.status = MSDDA_STEP_OK;
}

uint32_t msdda_step_version(void) { return MSDDA_STEP_VERSION; }

int msdda_step_init(void) {
    pthread_once(&init_once, load_driver);
    return drv.status;
}

int msdda_step_last_cuda_error(void) { return last_cuda_error; }

const char *msdda_step_triton_version(void) { return msdda_kernel_triton_version; }

const char *msdda_step_status_string(int status) {
    switch (status) {
    case MSDDA_STEP_OK: return "success";
    case MSDDA_STEP_ERR_INVALID_ARGUMENT: return "invalid argument";
    case MSDDA_STEP_ERR_NO_DRIVER: return "no CUDA driver (libcuda.so.1 could not be loaded)";
    case MSDDA_STEP_ERR_NO_DEVICE: return "no CUDA device (cuInit failed)";
    case MSDDA_STEP_ERR_NO_CONTEXT: return "no CUDA context is current on this thread";
    case MSDDA_STEP_ERR_UNSUPPORTED_ARCH: return "GPU architecture not compiled in (need sm_8x or sm_90)";
    case MSDDA_STEP_ERR_CUDA: return "a CUDA driver call failed (see msdda_step_last_cuda_error)";
    case MSDDA_STEP_ERR_ABI: return "msdda_step_args.struct_size is too small for this library";
    default: return "unknown status";
    }
}

int msdda_step_compiled_archs(int *archs, int max) {
    int n = 0;
    for (int i = 0; i < msdda_kernel_variant_count; i++) {
        int arch = msdda_kernel_variants[i].arch, seen = 0;
        for (int j = 0; j < i; j++)
            if (msdda_kernel_variants[j].arch == arch) seen = 1;
        if (seen) continue;
        if (archs && n < max) archs[n] = arch;
        n++;
    }
    return n;
}

/* Loaded functions, per (variant, context): a module belongs to one context. */
#define MSDDA_MAX_CONTEXTS 16
typedef struct { CUcontext ctx; CUfunction fn; } loaded_fn;
static loaded_fn loaded[256][MSDDA_MAX_CONTEXTS];
static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;

static int get_function(int v, CUcontext ctx, CUfunction *out) {
    int status = MSDDA_STEP_OK;
    if (v >= 256) return MSDDA_STEP_ERR_INVALID_ARGUMENT;
    pthread_mutex_lock(&load_lock);
    for (int i = 0; i < MSDDA_MAX_CONTEXTS; i++) {
        if (loaded[v][i].ctx == ctx && loaded[v][i].fn) {
            *out = loaded[v][i].fn;
            pthread_mutex_unlock(&load_lock);
            return MSDDA_STEP_OK;
        }
    }
    int slot = -1;
    for (int i = 0; i < MSDDA_MAX_CONTEXTS && slot < 0; i++)
        if (!loaded[v][i].ctx) slot = i;
    CUmodule mod = NULL;
    CUfunction fn = NULL;
    CUresult rc = drv.cuModuleLoadData(&mod, msdda_kernel_variants[v].cubin);
    if (rc == MSDDA_CUDA_SUCCESS) rc = drv.cuModuleGetFunction(&fn, mod, msdda_kernel_variants[v].name);
    if (rc != MSDDA_CUDA_SUCCESS) {
        last_cuda_error = rc;
        status = MSDDA_STEP_ERR_CUDA;
    } else {
        if (slot >= 0) { loaded[v][slot].ctx = ctx; loaded[v][slot].fn = fn; } /* else: not cached, still usable */
        *out = fn;
    }
    pthread_mutex_unlock(&load_lock);
    return status;
}

static int pick_arch(int major, int minor) {
    (void)minor;
    int want = major == 8 ? 80 : (major == 9 ? 90 : -1);   /* sm_80 SASS runs on every 8.x GPU */
    for (int i = 0; i < msdda_kernel_variant_count; i++)
        if (msdda_kernel_variants[i].arch == want) return want;
    return -1;
}

static int check_args(const msdda_step_args *a) {
    if (!a) return MSDDA_STEP_ERR_INVALID_ARGUMENT;
    if (a->struct_size < (uint32_t)sizeof(msdda_step_args)) return MSDDA_STEP_ERR_ABI;
    if (!a->raw || !a->x_t || !a->coeff || !a->x_prev || !a->error_count) return MSDDA_STEP_ERR_INVALID_ARGUMENT;
    if (a->K < 1 || a->B < 1 || a->C < 1 || a->spatial < 1) return MSDDA_STEP_ERR_INVALID_ARGUMENT;
    if (a->C_out != a->C && a->C_out != 2 * a->C) return MSDDA_STEP_ERR_INVALID_ARGUMENT;
    if (a->scalars.var_mode != MSDDA_VAR_FIXED && a->C_out != 2 * a->C) return MSDDA_STEP_ERR_INVALID_ARGUMENT;
    if (a->scalars.var_mode < 0 || a->scalars.var_mode > 2) return MSDDA_STEP_ERR_INVALID_ARGUMENT;
    if ((int64_t)a->C_out * a->spatial >= ((int64_t)1 << 31)) return MSDDA_STEP_ERR_INVALID_ARGUMENT;
    if (a->noise_mode == MSDDA_NOISE_GIVEN) {
        if (!a->noise) return MSDDA_STEP_ERR_INVALID_ARGUMENT;
    } else if (a->noise_mode == MSDDA_NOISE_PHILOX) {
        if (!a->seeds || a->seed_offset >= ((uint64_t)1 << 32)) return MSDDA_STEP_ERR_INVALID_ARGUMENT;
    } else {
        return MSDDA_STEP_ERR_INVALID_ARGUMENT;
    }
    if (a->cfg && !isfinite(a->guidance_scale)) return MSDDA_STEP_ERR_INVALID_ARGUMENT;
    if (!(a->scalars.clip > 0.0f)) return MSDDA_STEP_ERR_INVALID_ARGUMENT;
    /* 4-byte alignment of float/int32 buffers, 8 for the int64 seeds */
    if ((a->raw | a->x_t | a->coeff | a->x_prev | a->error_count | a->noise) & 3u) return MSDDA_STEP_ERR_INVALID_ARGUMENT;
    if (a->seeds & 7u) return MSDDA_STEP_ERR_INVALID_ARGUMENT;
    return MSDDA_STEP_OK;
}

int msdda_step_launch(const msdda_step_args *a, void *stream) {
    int status = check_args(a);
    if (status != MSDDA_STEP_OK) return status;
    status = msdda_step_init();
    if (status != MSDDA_STEP_OK) return status;

    CUcontext ctx = NULL;
    CUresult rc = drv.cuCtxGetCurrent(&ctx);
    if (rc != MSDDA_CUDA_SUCCESS) { last_cuda_error = rc; return MSDDA_STEP_ERR_CUDA; }
    if (!ctx) return MSDDA_STEP_ERR_NO_CONTEXT;
    CUdevice dev;
    int major = 0, minor = 0;
    rc = drv.cuCtxGetDevice(&dev);
    if (rc == MSDDA_CUDA_SUCCESS)
        rc = drv.cuDeviceGetAttribute(&major, MSDDA_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
    if (rc == MSDDA_CUDA_SUCCESS)
        rc = drv.cuDeviceGetAttribute(&minor, MSDDA_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
    if (rc != MSDDA_CUDA_SUCCESS) { last_cuda_error = rc; return MSDDA_STEP_ERR_CUDA; }
    int arch = pick_arch(major, minor);
    if (arch < 0) return MSDDA_STEP_ERR_UNSUPPORTED_ARCH;

    int cfg = a->cfg ? 1 : 0;
    int v = -1;
    for (int i = 0; i < msdda_kernel_variant_count; i++) {
        const msdda_kernel_variant *kv = &msdda_kernel_variants[i];
        if (kv->arch == arch && kv->var_mode == a->scalars.var_mode && kv->cfg == cfg && kv->noise == a->noise_mode) {
            v = i;
            break;
        }
    }
    if (v < 0) return MSDDA_STEP_ERR_UNSUPPORTED_ARCH;
    CUfunction fn = NULL;
    status = get_function(v, ctx, &fn);
    if (status != MSDDA_STEP_OK) return status;

    /* The kernel's parameters, in gen_kernels.py's SIGNATURE order, then Triton's global/profile scratch. */
    const int64_t S = a->spatial, G = cfg ? 2 : 1;
    CUdeviceptr raw = a->raw, xt = a->x_t, coeff = a->coeff, out = a->x_prev, err = a->error_count;
    CUdeviceptr noise = a->noise ? a->noise : a->x_prev;   /* unused by the variant when 0: any valid pointer */
    CUdeviceptr seeds = a->seeds ? a->seeds : a->x_prev;
    CUdeviceptr table = a->x_prev, step_ptr = a->x_prev;  /* the step table is the Python plan's; unused here */
    int32_t K = a->K, N = (int32_t)(a->C * S), B = a->B, step = 0, n_steps = 0;
    int64_t offset = (int64_t)a->seed_offset;
    int64_t stride_rb = (int64_t)a->C_out * S;
    int64_t stride_rg = cfg ? (int64_t)a->B * stride_rb : 0;
    int64_t stride_rk = G * (int64_t)a->B * stride_rb;
    int64_t stride_xb = (int64_t)N, stride_ck = 1, stride_cb = a->coeff_per_sample ? a->K : 0;
    int64_t stride_nb = a->noise_mode == MSDDA_NOISE_GIVEN ? (int64_t)N : 0, stride_ns = 0;
    float guidance = cfg ? a->guidance_scale : 1.0f;
    float px = a->scalars.px, po = a->scalars.po, mx = a->scalars.mx, m0 = a->scalars.m0, mo = a->scalars.mo;
    float clip = a->scalars.clip, var_fixed = a->scalars.var_fixed;
    /* LEARNED_RANGE: exp(frac lv_max + (1 - frac) lv_min), frac = (v + 1) / 2, is 2^(lr_a + lr_b v) */
    const double log2e = 1.4426950408889634;
    float lr_a = (float)(log2e * ((double)a->scalars.lv_max + (double)a->scalars.lv_min) / 2);
    float lr_b = (float)(log2e * ((double)a->scalars.lv_max - (double)a->scalars.lv_min) / 2);
    CUdeviceptr global_scratch = 0, profile_scratch = 0;
    void *params[] = {&raw, &xt, &coeff, &noise, &seeds, &out, &err, &table, &step_ptr,
                      &K, &N, &B, &offset, &step, &n_steps,
                      &stride_rk, &stride_rg, &stride_rb, &stride_xb, &stride_ck, &stride_cb, &stride_nb, &stride_ns,
                      &guidance, &px, &po, &mx, &m0, &mo, &clip, &var_fixed, &lr_a, &lr_b,
                      &global_scratch, &profile_scratch};
    const msdda_kernel_variant *kv = &msdda_kernel_variants[v];
    unsigned grid_x = (unsigned)((N + kv->block - 1) / kv->block);
    rc = drv.cuLaunchKernel(fn, grid_x, (unsigned)a->B, 1, 32u * (unsigned)kv->num_warps, 1, 1,
                            (unsigned)kv->shared, (CUstream)stream, params, NULL);
    if (rc != MSDDA_CUDA_SUCCESS) { last_cuda_error = rc; return MSDDA_STEP_ERR_CUDA; }
    return MSDDA_STEP_OK;
}
