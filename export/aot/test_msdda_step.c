/* Tests for libmsdda_step.
 *
 *   test_msdda_step --abi   GPU-free: version macros vs the library, status strings, compiled archs, argument
 *                           validation, and (without a driver) the no-driver error. Runs everywhere.
 *   test_msdda_step --gpu   Launches the fused step on the GPU and checks it against a float64 CPU reference
 *                           (given noise, CFG, each variance mode), Philox determinism and per-sample noise, and
 *                           the bad-element count. Without a driver/GPU it prints SKIP and exits 77 (ctest: skipped).
 */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "msdda_step.h"

#define SKIP_CODE 77
static int failures = 0;
#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);             \
            fprintf(stderr, __VA_ARGS__);                                    \
            fprintf(stderr, "\n");                                           \
            failures++;                                                      \
        }                                                                    \
    } while (0)

static msdda_step_args base_args(void) {
    msdda_step_args a;
    memset(&a, 0, sizeof(a));
    a.struct_size = sizeof(a);
    a.raw = 0x1000; a.x_t = 0x2000; a.coeff = 0x3000; a.noise = 0x4000; a.seeds = 0x5000; a.x_prev = 0x6000;
    a.error_count = 0x7000;
    a.K = 2; a.B = 1; a.C = 1; a.C_out = 2; a.spatial = 16; a.noise_mode = MSDDA_NOISE_GIVEN;
    a.scalars.px = 1; a.scalars.po = -1; a.scalars.mx = 0.5f; a.scalars.m0 = 0.5f; a.scalars.mo = 0;
    a.scalars.clip = INFINITY; a.scalars.var_fixed = 0.1f; a.scalars.var_mode = MSDDA_VAR_LEARNED_RANGE;
    a.scalars.lv_min = -3; a.scalars.lv_max = -1;
    return a;
}

static int test_abi(void) {
    printf("libmsdda_step %u (header %d), cubins by Triton %s\n", msdda_step_version(), MSDDA_STEP_VERSION,
           msdda_step_triton_version());
    CHECK(msdda_step_version() == MSDDA_STEP_VERSION, "library version %u != header %d", msdda_step_version(),
          MSDDA_STEP_VERSION);
    int archs[8] = {0};
    int n = msdda_step_compiled_archs(archs, 8);
    CHECK(n >= 1, "no architectures compiled in");
    for (int i = 0; i < n && i < 8; i++) printf("compiled for sm_%d\n", archs[i]);
    for (int s = 0; s <= 8; s++) CHECK(msdda_step_status_string(s) != NULL, "status %d has no string", s);
    CHECK(strcmp(msdda_step_status_string(MSDDA_STEP_OK), "success") == 0, "OK string");

    CHECK(msdda_step_launch(NULL, NULL) == MSDDA_STEP_ERR_INVALID_ARGUMENT, "NULL args accepted");
    msdda_step_args a = base_args();
    a.struct_size = 8;
    CHECK(msdda_step_launch(&a, NULL) == MSDDA_STEP_ERR_ABI, "short struct accepted");
    a = base_args(); a.C_out = 3;
    CHECK(msdda_step_launch(&a, NULL) == MSDDA_STEP_ERR_INVALID_ARGUMENT, "C_out 3 accepted");
    a = base_args(); a.C_out = 1;   /* learned variance needs 2C channels */
    CHECK(msdda_step_launch(&a, NULL) == MSDDA_STEP_ERR_INVALID_ARGUMENT, "learned variance with C_out = C accepted");
    a = base_args(); a.noise_mode = 3;
    CHECK(msdda_step_launch(&a, NULL) == MSDDA_STEP_ERR_INVALID_ARGUMENT, "noise mode 3 accepted");
    a = base_args(); a.noise_mode = MSDDA_NOISE_PHILOX; a.seed_offset = (uint64_t)1 << 32;
    CHECK(msdda_step_launch(&a, NULL) == MSDDA_STEP_ERR_INVALID_ARGUMENT, "offset 2^32 accepted");
    a = base_args(); a.x_t = 0x2002;
    CHECK(msdda_step_launch(&a, NULL) == MSDDA_STEP_ERR_INVALID_ARGUMENT, "misaligned pointer accepted");
    a = base_args(); a.error_count = 0;
    CHECK(msdda_step_launch(&a, NULL) == MSDDA_STEP_ERR_INVALID_ARGUMENT, "missing error counter accepted");
    a = base_args(); a.spatial = (int64_t)1 << 31;
    CHECK(msdda_step_launch(&a, NULL) == MSDDA_STEP_ERR_INVALID_ARGUMENT, "2^31 elements accepted");

    int init = msdda_step_init();
    printf("msdda_step_init: %s\n", msdda_step_status_string(init));
    if (init != MSDDA_STEP_OK) {   /* without a GPU a valid-looking launch must fail cleanly, not crash */
        a = base_args();
        int rc = msdda_step_launch(&a, NULL);
        CHECK(rc == MSDDA_STEP_ERR_NO_DRIVER || rc == MSDDA_STEP_ERR_NO_DEVICE, "launch without a GPU gave %d", rc);
    }
    printf("%s\n", failures ? "ABI tests FAILED" : "ABI tests passed");
    return failures ? 1 : 0;
}

/* ------------------------------------------------------------------------------------------ GPU test */
typedef int (*fn_i_u)(unsigned);
typedef int (*fn_get)(int *, int);
typedef int (*fn_retain)(void **, int);
typedef int (*fn_setcur)(void *);
typedef int (*fn_alloc)(unsigned long long *, size_t);
typedef int (*fn_free)(unsigned long long);
typedef int (*fn_htod)(unsigned long long, const void *, size_t);
typedef int (*fn_dtoh)(void *, unsigned long long, size_t);
typedef int (*fn_sync)(void);
static struct {
    fn_get cuDeviceGet; fn_retain cuDevicePrimaryCtxRetain; fn_setcur cuCtxSetCurrent; fn_alloc cuMemAlloc;
    fn_free cuMemFree; fn_htod cuMemcpyHtoD; fn_dtoh cuMemcpyDtoH; fn_sync cuCtxSynchronize;
} cu;

static unsigned long long dev_copy(const void *host, size_t bytes) {
    unsigned long long p = 0;
    if (cu.cuMemAlloc(&p, bytes ? bytes : 4) != 0) { fprintf(stderr, "cuMemAlloc failed\n"); exit(1); }
    if (host && cu.cuMemcpyHtoD(p, host, bytes) != 0) { fprintf(stderr, "cuMemcpyHtoD failed\n"); exit(1); }
    return p;
}

static double frand(unsigned *state) {
    *state = *state * 1664525u + 1013904223u;
    return ((*state >> 8) & 0xffffff) / (double)0x1000000;
}

/* float64 reference of the kernel's math for given noise */
static void reference(const msdda_step_args *a, const float *raw, const float *xt, const float *coeff,
                      const float *noise, double *out) {
    int K = a->K, B = a->B, G = a->cfg ? 2 : 1;
    int64_t S = a->spatial, N = a->C * S, R = a->C_out * S;
    for (int b = 0; b < B; b++)
        for (int64_t e = 0; e < N; e++) {
            double x = xt[b * N + e], P = 0, num = 0;
            for (int k = 0; k < K; k++) {
                const float *r = raw + ((int64_t)k * G * B) * R;
                double o, vch;
                if (a->cfg) {
                    double u = r[(0 * B + b) * R + e], c = r[(1 * B + b) * R + e];
                    o = u + a->guidance_scale * (c - u);
                    vch = a->C_out == 2 * a->C ? r[(1 * B + b) * R + N + e] : 0;
                } else {
                    o = r[b * R + e];
                    vch = a->C_out == 2 * a->C ? r[b * R + N + e] : 0;
                }
                const msdda_step_scalars *s = &a->scalars;
                double x0 = s->px * x + s->po * o;
                if (x0 > s->clip) x0 = s->clip;
                if (x0 < -s->clip) x0 = -s->clip;
                double m = s->mx * x + s->m0 * x0 + s->mo * o, var;
                if (s->var_mode == MSDDA_VAR_FIXED) var = s->var_fixed;
                else if (s->var_mode == MSDDA_VAR_LEARNED_RANGE) {
                    double frac = (vch + 1) / 2;
                    var = exp(frac * s->lv_max + (1 - frac) * s->lv_min);
                } else var = vch;
                double c = a->coeff_per_sample ? coeff[b * K + k] : coeff[k];
                P += c / var;
                num += c * m / var;
            }
            out[b * N + e] = num / P + noise[b * N + e] / sqrt(P);
        }
}

static int run_case(int var_mode, int cfg, int per_sample) {
    msdda_step_args a = base_args();
    a.K = 3; a.B = 2; a.C = 2; a.spatial = 1000 + 37;  /* N = 2074: spans 3 blocks, the last partial */
    a.C_out = var_mode == MSDDA_VAR_FIXED ? a.C : 2 * a.C;
    a.cfg = cfg; a.guidance_scale = 3.0f; a.coeff_per_sample = per_sample;
    a.scalars.var_mode = var_mode; a.scalars.clip = 1.5f;
    int G = cfg ? 2 : 1;
    int64_t N = a.C * a.spatial, R = a.C_out * a.spatial;
    size_t nraw = (size_t)a.K * G * a.B * R, nx = (size_t)a.B * N;
    float *raw = malloc(nraw * 4), *xt = malloc(nx * 4), *noise = malloc(nx * 4), *got = malloc(nx * 4);
    float coeff[6] = {0.5f, 0.3f, 0.2f, 0.2f, 0.6f, 0.4f};
    double *ref = malloc(nx * 8);
    unsigned st = 12345u + var_mode * 7 + cfg;
    for (size_t i = 0; i < nraw; i++) raw[i] = (float)(frand(&st) * 2 - 1);
    if (var_mode == MSDDA_VAR_LEARNED)  /* positive variances in the variance channel */
        for (size_t i = 0; i < nraw; i++) if ((i % R) >= (size_t)N) raw[i] = (float)(0.05 + frand(&st));
    for (size_t i = 0; i < nx; i++) { xt[i] = (float)(frand(&st) * 2 - 1); noise[i] = (float)(frand(&st) * 2 - 1); }
    a.raw = dev_copy(raw, nraw * 4); a.x_t = dev_copy(xt, nx * 4); a.coeff = dev_copy(coeff, sizeof coeff);
    a.noise = dev_copy(noise, nx * 4); a.x_prev = dev_copy(NULL, nx * 4);
    int zero = 0;
    a.error_count = dev_copy(&zero, 4);
    int rc = msdda_step_launch(&a, NULL);
    CHECK(rc == MSDDA_STEP_OK, "launch var_mode=%d cfg=%d: %s (CUresult %d)", var_mode, cfg,
          msdda_step_status_string(rc), msdda_step_last_cuda_error());
    cu.cuCtxSynchronize();
    cu.cuMemcpyDtoH(got, a.x_prev, nx * 4);
    int bad = -1;
    cu.cuMemcpyDtoH(&bad, a.error_count, 4);
    reference(&a, raw, xt, coeff, noise, ref);
    double worst = 0;
    for (size_t i = 0; i < nx; i++) {
        double err = fabs(got[i] - ref[i]) / (1 + fabs(ref[i]));
        if (!(err <= worst)) worst = err;
    }
    printf("var_mode=%d cfg=%d coeff_per_sample=%d: max rel err %.3g, bad elements %d\n", var_mode, cfg, per_sample,
           worst, bad);
    CHECK(worst < 1e-4, "var_mode=%d cfg=%d: max rel err %g", var_mode, cfg, worst);
    CHECK(bad == 0, "var_mode=%d cfg=%d: %d bad elements", var_mode, cfg, bad);
    cu.cuMemFree(a.raw); cu.cuMemFree(a.x_t); cu.cuMemFree(a.coeff); cu.cuMemFree(a.noise); cu.cuMemFree(a.x_prev);
    cu.cuMemFree(a.error_count);
    free(raw); free(xt); free(noise); free(got); free(ref);
    return 0;
}

static void run_philox(void) {
    msdda_step_args a = base_args();
    a.K = 2; a.B = 2; a.C = 1; a.C_out = 1; a.spatial = 4096; a.scalars.var_mode = MSDDA_VAR_FIXED;
    a.scalars.var_fixed = 0.25f; a.noise_mode = MSDDA_NOISE_PHILOX; a.seed_offset = 5;
    size_t N = 4096, nraw = 2 * 2 * N;
    float *raw = calloc(nraw, 4), *xt = calloc(2 * N, 4), *o1 = malloc(2 * N * 4), *o2 = malloc(2 * N * 4);
    float coeff[2] = {0.5f, 0.5f};
    int64_t seeds[2] = {1234, 1234};
    a.raw = dev_copy(raw, nraw * 4); a.x_t = dev_copy(xt, 2 * N * 4); a.coeff = dev_copy(coeff, 8);
    a.seeds = dev_copy(seeds, 16); a.x_prev = dev_copy(NULL, 2 * N * 4);
    int zero = 0;
    a.error_count = dev_copy(&zero, 4);
    a.noise = 0;
    CHECK(msdda_step_launch(&a, NULL) == MSDDA_STEP_OK, "philox launch");
    cu.cuCtxSynchronize();
    cu.cuMemcpyDtoH(o1, a.x_prev, 2 * N * 4);
    CHECK(msdda_step_launch(&a, NULL) == MSDDA_STEP_OK, "philox relaunch");
    cu.cuCtxSynchronize();
    cu.cuMemcpyDtoH(o2, a.x_prev, 2 * N * 4);
    CHECK(memcmp(o1, o2, 2 * N * 4) == 0, "same seed and offset gave different noise");
    CHECK(memcmp(o1, o1 + N, N * 4) == 0, "two samples with one seed got different noise");
    /* mu = 0, P = sum c / var = 4: x = z / 2, so the sample variance is ~0.25 */
    double s2 = 0;
    for (size_t i = 0; i < N; i++) s2 += (double)o1[i] * o1[i];
    s2 /= N;
    CHECK(fabs(s2 - 0.25) < 0.03, "Philox noise variance %g, want 0.25", s2);
    a.seed_offset = 6;
    CHECK(msdda_step_launch(&a, NULL) == MSDDA_STEP_OK, "philox launch offset 6");
    cu.cuCtxSynchronize();
    cu.cuMemcpyDtoH(o2, a.x_prev, 2 * N * 4);
    CHECK(memcmp(o1, o2, N * 4) != 0, "another step offset gave the same noise");
    /* P <= 0: negative exponents everywhere are counted as bad elements */
    float neg[2] = {-0.5f, -0.5f};
    cu.cuMemcpyHtoD(a.coeff, neg, 8);
    CHECK(msdda_step_launch(&a, NULL) == MSDDA_STEP_OK, "launch with P <= 0");
    cu.cuCtxSynchronize();
    int bad = 0;
    cu.cuMemcpyDtoH(&bad, a.error_count, 4);
    CHECK(bad == (int)(2 * N), "P <= 0 counted %d bad elements, want %zu", bad, 2 * N);
    printf("philox: deterministic, per-sample, variance %.4f; P<=0 counted %d\n", s2, bad);
    free(raw); free(xt); free(o1); free(o2);
}

static int test_gpu(void) {
    int init = msdda_step_init();
    if (init != MSDDA_STEP_OK) {
        printf("SKIP: %s: the GPU test needs an NVIDIA GPU and driver\n", msdda_step_status_string(init));
        return SKIP_CODE;
    }
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) { printf("SKIP: libcuda.so.1 not loadable\n"); return SKIP_CODE; }
    cu.cuDeviceGet = (fn_get)dlsym(lib, "cuDeviceGet");
    cu.cuDevicePrimaryCtxRetain = (fn_retain)dlsym(lib, "cuDevicePrimaryCtxRetain");
    cu.cuCtxSetCurrent = (fn_setcur)dlsym(lib, "cuCtxSetCurrent");
    cu.cuMemAlloc = (fn_alloc)dlsym(lib, "cuMemAlloc_v2");
    cu.cuMemFree = (fn_free)dlsym(lib, "cuMemFree_v2");
    cu.cuMemcpyHtoD = (fn_htod)dlsym(lib, "cuMemcpyHtoD_v2");
    cu.cuMemcpyDtoH = (fn_dtoh)dlsym(lib, "cuMemcpyDtoH_v2");
    cu.cuCtxSynchronize = (fn_sync)dlsym(lib, "cuCtxSynchronize");
    int dev = 0;
    void *ctx = NULL;
    if (cu.cuDeviceGet(&dev, 0) || cu.cuDevicePrimaryCtxRetain(&ctx, dev) || cu.cuCtxSetCurrent(ctx)) {
        printf("SKIP: no usable CUDA device 0\n");
        return SKIP_CODE;
    }
    for (int vm = 0; vm < 3; vm++)
        for (int cfg = 0; cfg < 2; cfg++) run_case(vm, cfg, (vm + cfg) % 2);
    run_philox();
    printf("%s\n", failures ? "GPU tests FAILED" : "GPU tests passed");
    return failures ? 1 : 0;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "--abi";
    if (strcmp(mode, "--abi") == 0) return test_abi();
    if (strcmp(mode, "--gpu") == 0) return test_gpu();
    fprintf(stderr, "usage: %s --abi | --gpu\n", argv[0]);
    return 2;
}
