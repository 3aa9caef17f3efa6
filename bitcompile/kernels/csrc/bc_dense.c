/* Dense GEMV for the layers a packed model keeps out of ternary (the tied lm_head above all):
 * fp32 weights, or int8 weights with int8 activations (W8A8, pack(head="int8")).
 *
 * Why: torch's fp32 F.linear at M = 1 runs MKL's single-threaded GEMV (measured 16.9 GB/s on
 * the 576 x 49152 SmolLM head, no faster with 2 threads), which after packing is a third of
 * a decode step. This streams the weight once with every thread, for M <= BC_DENSE_MAX_M.
 * The sum order differs from MKL's, so results agree within fp32 rounding, not bitwise.
 */
#include <stdint.h>

#include "bc_kernels.h"

#define NR 4  /* weight rows per tile: one pass over x serves four dot products */

static void dense_tile_generic(const bc_dense_args *a, int n, int nr) {
    for (int m = 0; m < a->M; m++) {
        const float *x = a->x + (int64_t)m * a->ldx;
        for (int j = 0; j < nr; j++) {
            const float *w = a->w + (int64_t)(n + j) * a->ldw;
            float acc[8] = { 0 };
            int k = 0;
            for (; k + 8 <= a->K; k += 8)
                for (int l = 0; l < 8; l++) acc[l] += x[k + l] * w[k + l];
            for (; k < a->K; k++) acc[k % 8] += x[k] * w[k];
            float y = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
            if (a->bias) y += a->bias[n + j];
            a->out[(int64_t)m * a->ldo + n + j] = y;
        }
    }
}

void bc_dense_f32_generic(const bc_dense_args *a, int n0, int n1) {
    for (int n = n0; n < n1; n += NR) dense_tile_generic(a, n, n1 - n < NR ? n1 - n : NR);
}

/* W8A8: y = (float)dot * sw[n] * sx[m] (+ bias), the ternary kernels' order of roundings */
static inline float i8_finish(const bc_dense_args *a, int m, int n, int32_t dot) {
    float y = (float)dot * a->sw[n] * a->sx[m];
    return a->bias ? y + a->bias[n] : y;
}

void bc_dense_i8_generic(const bc_dense_args *a, int n0, int n1) {
    for (int n = n0; n < n1; n++) {
        const int8_t *w = a->wq + (int64_t)n * a->ldw;
        for (int m = 0; m < a->M; m++) {
            const int8_t *x = a->xq + (int64_t)m * a->Kp;
            int32_t dot = 0;
            for (int k = 0; k < a->K; k++) dot += (int32_t)x[k] * w[k];
            a->out[(int64_t)m * a->ldo + n] = i8_finish(a, m, n, dot);
        }
    }
}

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

__attribute__((target("avx2,fma"))) static float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

__attribute__((target("avx2,fma"))) void bc_dense_f32_avx2(const bc_dense_args *a, int n0, int n1) {
    const int K8 = a->K & ~7;
    for (int n = n0; n < n1; n += NR) {
        int nr = n1 - n < NR ? n1 - n : NR;
        if (nr < NR || K8 != a->K) {
            dense_tile_generic(a, n, nr);
            continue;
        }
        const float *w0 = a->w + (int64_t)n * a->ldw;
        for (int m = 0; m < a->M; m++) {
            const float *x = a->x + (int64_t)m * a->ldx;
            __m256 acc[NR];
            for (int j = 0; j < NR; j++) acc[j] = _mm256_setzero_ps();
            for (int k = 0; k < K8; k += 8) {
                __m256 xv = _mm256_loadu_ps(x + k);
                for (int j = 0; j < NR; j++) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + j * a->ldw + k), xv, acc[j]);
            }
            for (int j = 0; j < NR; j++) {
                float y = hsum256(acc[j]);
                if (a->bias) y += a->bias[n + j];
                a->out[(int64_t)m * a->ldo + n + j] = y;
            }
        }
    }
}

__attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))) void bc_dense_f32_avx512(const bc_dense_args *a, int n0, int n1) {
    for (int n = n0; n < n1; n += NR) {
        int nr = n1 - n < NR ? n1 - n : NR;
        const float *w0 = a->w + (int64_t)n * a->ldw;
        /* NOTE: four rows read side by side are four streams; prefetch the next tile ahead */
        const char *pf = (const char *)(w0 + (int64_t)NR * a->ldw);
        const int do_pf = n + 2 * NR <= a->N && a->ldw == a->K;
        for (int m = 0; m < a->M; m++) {
            const float *x = a->x + (int64_t)m * a->ldx;
            __m512 acc[NR];
            for (int j = 0; j < NR; j++) acc[j] = _mm512_setzero_ps();
            for (int k = 0; k < a->K; k += 16) {
                __mmask16 mk = a->K - k >= 16 ? 0xffff : (__mmask16)((1u << (a->K - k)) - 1);
                __m512 xv = _mm512_maskz_loadu_ps(mk, x + k);
                if (m == 0 && do_pf)
                    for (int j = 0; j < NR; j++) _mm_prefetch(pf + 4 * ((int64_t)NR * k + 16 * j), _MM_HINT_T0);
                for (int j = 0; j < nr; j++)
                    acc[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w0 + j * a->ldw + k), xv, acc[j]);
            }
            for (int j = 0; j < nr; j++) {
                float y = _mm512_reduce_add_ps(acc[j]);
                if (a->bias) y += a->bias[n + j];
                a->out[(int64_t)m * a->ldo + n + j] = y;
            }
        }
    }
}

/* vpdpbusd multiplies unsigned by signed bytes: feed the weights as w + 128 (w ^ 0x80) against
 * the signed activations and subtract 128 * sum_k x[m, k] (a->xsum) from the exact int32 sum.
 * NOTE: the correction is a sum over the activations, computed once per call; the former one,
 * sum_k w[n, k], was cached per weight tensor and went stale when the codes were written
 * behind their version counter (issue 15). Padding lanes: w 0 -> 128, times x 0. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"))) static inline void
i8_tile_avx512(const bc_dense_args *a, int m0, int n, const int MR, const int NR_) {
    __m512i acc[4][NR];
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int m = 0; m < MR; m++)
        for (int j = 0; j < NR_; j++) acc[m][j] = _mm512_setzero_si512();
    const int8_t *w0 = a->wq + (int64_t)n * a->ldw;
    /* NOTE: as in the fp32 kernel: prefetch the tile 4 KiB past the next one, NR lines a step */
    const char *pf = (const char *)(w0 + (int64_t)NR_ * a->ldw) + 4096;
    const int do_pf = m0 == 0 && a->ldw == a->K && pf + (int64_t)NR_ * a->K <= (const char *)(a->wq + (int64_t)a->N * a->ldw);
    for (int k = 0; k < a->K; k += 64) {
        __mmask64 mk = a->K - k >= 64 ? ~0ULL : (1ULL << (a->K - k)) - 1;
        if (do_pf)
            for (int j = 0; j < NR_; j++) _mm_prefetch(pf + (int64_t)NR_ * k + 64 * j, _MM_HINT_T0);
        __m512i wv[NR];
        for (int j = 0; j < NR_; j++) wv[j] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, w0 + j * a->ldw + k), flip);
        for (int m = 0; m < MR; m++) {
            __m512i xv = _mm512_loadu_si512(a->xq + (int64_t)(m0 + m) * a->Kp + k);
            for (int j = 0; j < NR_; j++) acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], wv[j], xv);
        }
    }
    for (int m = 0; m < MR; m++)
        for (int j = 0; j < NR_; j++) {
            int32_t dot = _mm512_reduce_add_epi32(acc[m][j]) - 128 * a->xsum[m0 + m];
            a->out[(int64_t)(m0 + m) * a->ldo + n + j] = i8_finish(a, m0 + m, n + j, dot);
        }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"))) void bc_dense_i8_avx512(const bc_dense_args *a,
                                                                                            int n0, int n1) {
    for (int n = n0; n < n1; n += NR) {
        int nr = n1 - n < NR ? n1 - n : NR;
        for (int m = 0; m < a->M; m += 4) {
            int mr = a->M - m < 4 ? a->M - m : 4;
            if (nr == NR) {
                switch (mr) {
                case 1: i8_tile_avx512(a, m, n, 1, NR); break;
                case 2: i8_tile_avx512(a, m, n, 2, NR); break;
                case 3: i8_tile_avx512(a, m, n, 3, NR); break;
                default: i8_tile_avx512(a, m, n, 4, NR); break;
                }
            } else {
                for (int j = 0; j < nr; j++) i8_tile_avx512(a, m, n + j, mr, 1);
            }
        }
    }
}
#endif
