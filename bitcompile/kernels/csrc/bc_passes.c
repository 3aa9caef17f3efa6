/* Elementwise passes of the int8 training path (and the 2-bit decode of large-M serving),
 * each one pass over memory.
 *
 * Why: around the int8 GEMMs (torch._int_mm) and the bf16 grad_weight GEMM, the training step
 * converts and scales whole activation / gradient matrices: int32 sums -> scaled fp32, g * s
 * -> bf16 operands, fp32 weights -> ternary codes. As chains of torch ops each is 2-4 passes
 * with a fresh allocation per pass, and mixed-dtype torch ops (fp32 * fp32 -> bf16 out) ran
 * at a fraction of memory speed: together ~15 % of a QAT step of the tiny Llama on 2 cores.
 *
 * The loops are written once in plain C and compiled three times (portable, AVX2, AVX-512)
 * so the compiler vectorizes each for its ISA; every rounding is the one torch does (IEEE
 * multiply and divide in fp32, int32 -> fp32 to nearest even, fp32 -> bf16 to nearest even),
 * so results are bit-identical with the torch expressions they replace.
 */
#include <stdint.h>

#include "bc_kernels.h"

#define BODY static inline __attribute__((always_inline))

/* y = ((x * col[n]) * row[m]) * scalar (+ bias[n]); missing factors are 1, an exact multiply. */
BODY void scale_rows(const bc_ew_args *a, int m0, int m1) {
    const int64_t N = a->N;
    const int in_size = a->x_kind == BC_EW_F32 || a->x_kind == BC_EW_I32 ? 4 : a->x_kind == BC_EW_BF16 ? 2 : 1;
    for (int m = m0; m < m1; m++) {
        const char *xr = (const char *)a->x + (int64_t)m * a->ldx * in_size;
        const float r = a->row ? a->row[m] : 1.f, s = a->scalar;
        float *of = (float *)a->out + (int64_t)m * a->ldo;
        uint16_t *oh = (uint16_t *)a->out + (int64_t)m * a->ldo;
        /* NOTE: one loop per input kind and output kind, so each vectorizes without branches */
#define BC_SCALE_LOOP(LOAD, STORE)                                       \
    for (int64_t n = 0; n < N; n++) {                                    \
        float v = (LOAD) * (a->col ? a->col[n] : 1.f);                   \
        v = v * r;                                                       \
        v = v * s;                                                       \
        if (a->bias) v = v + a->bias[n];                                 \
        STORE;                                                           \
    }
#define BC_SCALE_OUT(LOAD)                                                   \
    if (a->out_bf16) BC_SCALE_LOOP(LOAD, oh[n] = bc_f32_to_bf16(v))          \
    else BC_SCALE_LOOP(LOAD, of[n] = v)
        switch (a->x_kind) {
        case BC_EW_F32: BC_SCALE_OUT(((const float *)xr)[n]) break;
        case BC_EW_BF16: BC_SCALE_OUT(bc_bf16_to_f32(((const uint16_t *)xr)[n])) break;
        case BC_EW_I8: BC_SCALE_OUT((float)((const int8_t *)xr)[n]) break;
        default: BC_SCALE_OUT((float)((const int32_t *)xr)[n]) break;
        }
#undef BC_SCALE_OUT
#undef BC_SCALE_LOOP
    }
}

/* Ternary codes clamp(round_half_even(w / s), -1, 1): for v = w / s that is +1 above 0.5,
 * -1 below -0.5, else 0 (round(+-0.5) = 0, round(+-1.5) = +-2 clamps to +-1; NaN gives 0,
 * and its row's scale is NaN too). No rounding instruction needed, so every ISA vectorizes it. */
BODY void ternary_rows(const bc_ew_args *a, int m0, int m1) {
    const int64_t N = a->N;
    for (int m = m0; m < m1; m++) {
        const float *w = (const float *)a->x + (int64_t)m * a->ldx;
        int8_t *q = (int8_t *)a->out + (int64_t)m * a->ldo;
        const float s = a->row[m];
        for (int64_t n = 0; n < N; n++) {
            float v = w[n] / s;
            q[n] = (int8_t)((v > 0.5f) - (v < -0.5f));
        }
    }
}

/* 2-bit packed rows (bc_i2_planar256_t64 v2, a->ldx bytes each) -> int8 codes q = c - 1 of
 * k < a->N: the large-M serving path decodes weight tiles for a dense int8 GEMM. */
BODY void unpack_rows(const bc_ew_args *a, int m0, int m1) {
    const int K = a->N, Kp = (K + BC_PAD_K - 1) / BC_PAD_K * BC_PAD_K, nb = Kp / BC_BLOCK_K;
    for (int m = m0; m < m1; m++) {
        const uint8_t *row = (const uint8_t *)a->x + (int64_t)m * a->ldx;
        int8_t *q = (int8_t *)a->out + (int64_t)m * a->ldo;
        for (int ch = 0; ch < Kp / BC_CHUNK_K; ch++) {
            const int k0 = BC_CHUNK_K * ch, lim = K - k0 < BC_CHUNK_K ? K - k0 : BC_CHUNK_K;
            if (ch < 4 * nb) {  /* plane ch % 4 of the 64 bytes of block ch / 4 */
                const uint8_t *src = row + 64 * (ch / 4);
                const int shift = 2 * (ch % 4);
                for (int j = 0; j < lim; j++) q[k0 + j] = (int8_t)(((src[j] >> shift) & 3) - 1);
            } else {  /* tail chunk: four planes of 16 from one 16-byte group */
                const uint8_t *src = row + 64 * nb + BC_TAIL_BYTES * (ch - 4 * nb);
                for (int i = 0; i < 4; i++)
                    for (int j = 0; j < 16 && 16 * i + j < lim; j++)
                        q[k0 + 16 * i + j] = (int8_t)(((src[j] >> (2 * i)) & 3) - 1);
            }
        }
    }
}

BODY void ew_rows(const bc_ew_args *a, int m0, int m1) {
    if (a->op == BC_EW_TERNARY) ternary_rows(a, m0, m1);
    else if (a->op == BC_EW_UNPACK) unpack_rows(a, m0, m1);
    else scale_rows(a, m0, m1);
}

void bc_ew_generic(const bc_ew_args *a, int m0, int m1) { ew_rows(a, m0, m1); }

#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx2,fma"))) void bc_ew_avx2(const bc_ew_args *a, int m0, int m1) { ew_rows(a, m0, m1); }

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))) void bc_ew_avx512(const bc_ew_args *a, int m0,
                                                                                        int m1) {
    ew_rows(a, m0, m1);
}
#endif
