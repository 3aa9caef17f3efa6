/* AVX2 + FMA kernels (x86-64 without AVX-512 VNNI).
 *
 * int8 path: vpmaddubsw multiplies unsigned codes c in {0, 1, 2} with int8 activations and
 * adds pairs into int16 (|2*2*128| = 512, no saturation); vpmaddwd with ones widens to
 * int32 lanes of 4 adjacent products, the same lanes vpdpbusd gives. Groups: per row, per
 * tensor and g % 64 == 0 (a flush unit is whole chunks); other g run the generic kernel.
 */
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma")
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "bc_kernels.h"

#define INLINE static inline __attribute__((always_inline))

/* 32 codes of plane i from 32 packed bytes */
INLINE __m256i plane_var(__m256i raw, int i) {
    return _mm256_and_si256(_mm256_srl_epi16(raw, _mm_cvtsi32_si128(2 * i)), _mm256_set1_epi8(3));
}

/* the 64 codes of chunk ch (row with nb full blocks) as two halves of 32; a tail chunk's
 * 16 bytes (planes of 16) are broadcast to both 128-bit lanes and shifted per lane */
INLINE void chunk_codes(const uint8_t *w, int ch, int nb, __m256i *lo, __m256i *hi) {
    if (ch < 4 * nb) {
        const uint8_t *blk = w + 64 * (ch / 4);
        *lo = plane_var(_mm256_loadu_si256((const __m256i *)blk), ch % 4);
        *hi = plane_var(_mm256_loadu_si256((const __m256i *)(blk + 32)), ch % 4);
    } else {
        __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(w + 64 * nb + BC_TAIL_BYTES * (ch - 4 * nb))));
        const __m256i m3 = _mm256_set1_epi8(3);
        *lo = _mm256_and_si256(_mm256_srlv_epi32(raw, _mm256_set_epi32(2, 2, 2, 2, 0, 0, 0, 0)), m3);
        *hi = _mm256_and_si256(_mm256_srlv_epi32(raw, _mm256_set_epi32(6, 6, 6, 6, 4, 4, 4, 4)), m3);
    }
}

INLINE int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE void tile_i8(const bc_gemm_args *a, int m0, int n0, const int MR, const int NR) {
    const int64_t ldw = a->Kp / 4;
    const int nchk = (a->K + BC_CHUNK_K - 1) / BC_CHUNK_K;
    const int grouped = a->group > 0;
    const int uc = grouped ? a->unit_chunks : nchk;
    const int nb = a->Kp / BC_BLOCK_K;
    const __m256i ones16 = _mm256_set1_epi16(1);
    const uint8_t *wp[2];
    const int8_t *xp[4];
    __m256 facc[4][2];
    int32_t dots[4][2] = {{0}};
    for (int n = 0; n < NR; n++) wp[n] = a->w + (int64_t)(n0 + n) * ldw;
    for (int m = 0; m < MR; m++) xp[m] = a->xq + (int64_t)(m0 + m) * a->Kp;
    for (int m = 0; m < MR; m++)
        for (int n = 0; n < NR; n++) facc[m][n] = _mm256_setzero_ps();
    for (int u = 0; u * uc < nchk; u++) {
        __m256i acc[4][2];
        for (int m = 0; m < MR; m++)
            for (int n = 0; n < NR; n++) acc[m][n] = _mm256_setzero_si256();
        int ch1 = (u + 1) * uc < nchk ? (u + 1) * uc : nchk;
        for (int ch = u * uc; ch < ch1; ch++) {
            __m256i wlo[2], whi[2];
            for (int n = 0; n < NR; n++) chunk_codes(wp[n], ch, nb, &wlo[n], &whi[n]);
            for (int m = 0; m < MR; m++) {
                __m256i xlo = _mm256_loadu_si256((const __m256i *)(xp[m] + 64 * ch));
                __m256i xhi = _mm256_loadu_si256((const __m256i *)(xp[m] + 64 * ch + 32));
                for (int n = 0; n < NR; n++) {
                    __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(wlo[n], xlo), _mm256_maddubs_epi16(whi[n], xhi));
                    acc[m][n] = _mm256_add_epi32(acc[m][n], _mm256_madd_epi16(t, ones16));
                }
            }
        }
        for (int m = 0; m < MR; m++) {
            const int32_t *c = a->corr + ((int64_t)(m0 + m) * a->n_units + u) * 16;
            __m256i cv = _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)c), _mm256_loadu_si256((const __m256i *)(c + 8)));
            for (int n = 0; n < NR; n++) {
                __m256i d = _mm256_sub_epi32(acc[m][n], cv);
                if (grouped) {
                    __m256 s = _mm256_set1_ps(a->sw[(int64_t)(n0 + n) * a->G + u]);  /* unit u is group u */
                    facc[m][n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, facc[m][n]);
                } else {
                    dots[m][n] = hsum_epi32(d);
                }
            }
        }
    }
    for (int m = 0; m < MR; m++)
        for (int n = 0; n < NR; n++) {
            float y = grouped ? hsum_ps(facc[m][n]) : (float)dots[m][n] * a->sw[(int64_t)(n0 + n) * a->G];
            bc_store(a, m0 + m, n0 + n, bc_finish_row(a, m0 + m, n0 + n, y));
        }
}

void bc_gemm_i2_i8_avx2(const bc_gemm_args *a, int n0, int n1) {
    const int MR = 4, NR = 2;
    int mc = a->M;
    if (a->M > 8) {
        mc = (int)((384 * 1024) / (a->Kp > 0 ? a->Kp : 1)) & ~3;
        if (mc < 4) mc = 4;
    }
    if (a->K == 0) {  /* no chunks: every dot is 0 */
        for (int n = n0; n < n1; n++)
            for (int m = 0; m < a->M; m++) bc_store(a, m, n, bc_finish_row(a, m, n, 0.f * a->sw[(int64_t)n * a->G]));
        return;
    }
    for (int mb = 0; mb < a->M; mb += mc) {
        int me = mb + mc < a->M ? mb + mc : a->M;
        for (int n = n0; n < n1; n += NR) {
            int nr = n1 - n < NR ? n1 - n : NR;
            for (int m = mb; m < me; m += MR) {
                int mr = me - m < MR ? me - m : MR;
                switch (mr * 8 + nr) {
                case 9: tile_i8(a, m, n, 1, 1); break;
                case 10: tile_i8(a, m, n, 1, 2); break;
                case 17: tile_i8(a, m, n, 2, 1); break;
                case 18: tile_i8(a, m, n, 2, 2); break;
                case 25: tile_i8(a, m, n, 3, 1); break;
                case 26: tile_i8(a, m, n, 3, 2); break;
                case 33: tile_i8(a, m, n, 4, 1); break;
                default: tile_i8(a, m, n, 4, 2); break;
                }
            }
        }
    }
}

/* ---- weight-only fp32: unpack 8 codes to fp32 lanes, FMA with x; per row / tensor / g % 64 == 0 ---- */
INLINE void tile_f32(const bc_gemm_args *a, int m0, int n, const int MR) {
    const int64_t ldw = a->Kp / 4;
    const int nfull = a->K / BC_CHUNK_K;  /* chunks fully inside K: SIMD; the rest scalar */
    const int g = a->group;
    const int uc = g > 0 ? g / 64 : (nfull > 0 ? nfull : 1);
    const int nb = a->Kp / BC_BLOCK_K;
    const uint8_t *wp = a->w + (int64_t)n * ldw;
    const float *sw = a->sw + (int64_t)n * a->G;
    const __m256 one = _mm256_set1_ps(1.f);
    const __m256i m3 = _mm256_set1_epi32(3);
    __m256 acc[4], facc[4];
    for (int m = 0; m < MR; m++) acc[m] = facc[m] = _mm256_setzero_ps();
    for (int ch = 0; ch < nfull; ch++) {
        const int tail = ch >= 4 * nb;
        const uint8_t *blk = tail ? wp + 64 * nb + BC_TAIL_BYTES * (ch - 4 * nb) : wp + 64 * (ch / 4);
        for (int j = 0; j < 64; j += 8) {
            /* full block: bytes j.., plane ch % 4; tail chunk: bytes j % 16.., plane j / 16 */
            __m128i sh = _mm_cvtsi32_si128(tail ? 2 * (j / 16) : 2 * (ch % 4));
            const uint8_t *src = tail ? blk + j % 16 : blk + j;
            __m256i c = _mm256_and_si256(_mm256_srl_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)src)), sh), m3);
            __m256 w = _mm256_sub_ps(_mm256_cvtepi32_ps(c), one);
            for (int m = 0; m < MR; m++)
                acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(a->xf + (int64_t)(m0 + m) * a->ldxf + 64 * ch + j), w, acc[m]);
        }
        if ((ch + 1) % uc == 0 || ch + 1 == nfull) {
            __m256 s = _mm256_set1_ps(sw[g > 0 ? (64 * ch) / g : 0]);
            for (int m = 0; m < MR; m++) {
                facc[m] = _mm256_fmadd_ps(acc[m], s, facc[m]);
                acc[m] = _mm256_setzero_ps();
            }
        }
    }
    for (int m = 0; m < MR; m++) {
        const float *x = a->xf + (int64_t)(m0 + m) * a->ldxf;
        float tail = 0.f;
        for (int k = 64 * nfull; k < a->K; k++) {
            int c = bc_code_at(wp, k, nb);
            tail += x[k] * (float)(c - 1);
        }
        float y = hsum_ps(facc[m]);
        if (64 * nfull < a->K) y += tail * sw[g > 0 ? (64 * nfull) / g : 0];
        if (a->bias) y = y + bc_bias_at(a, n);
        bc_store(a, m0 + m, n, y);
    }
}

void bc_gemm_i2_f32_avx2(const bc_gemm_args *a, int n0, int n1) {
    for (int n = n0; n < n1; n++) {
        for (int m = 0; m < a->M; m += 4) {
            switch (a->M - m < 4 ? a->M - m : 4) {
            case 1: tile_f32(a, m, n, 1); break;
            case 2: tile_f32(a, m, n, 2); break;
            case 3: tile_f32(a, m, n, 3); break;
            default: tile_f32(a, m, n, 4); break;
            }
        }
    }
}

/* ---- per-token absmax int8 quantization (bit-exact with the reference) + corr ---- */
INLINE __m256 load8(const bc_prep_args *a, const void *row, int k) {
    __m256 v;
    if (a->x_kind == 0) {
        v = _mm256_loadu_ps((const float *)row + k);
    } else {
        __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + k)));
        v = _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
    }
    return a->colscale ? _mm256_mul_ps(v, _mm256_loadu_ps(a->colscale + k)) : v;
}

INLINE float load1(const bc_prep_args *a, const void *row, int k) {
    float v = a->x_kind == 0 ? ((const float *)row)[k] : bc_bf16_to_f32(((const uint16_t *)row)[k]);
    return a->colscale ? v * a->colscale[k] : v;
}

void bc_prep_i8_avx2(const bc_prep_args *a, int m0, int m1) {
    const int K = a->K, K8 = K & ~7;
    for (int m = m0; m < m1; m++) {
        int8_t *q = a->xq + (int64_t)m * a->Kp;
        if (a->x_kind == 2) {
            memcpy(q, (const int8_t *)a->x + (int64_t)m * a->ldx, (size_t)K);
        } else {
            const void *row = a->x_kind == 0 ? (const void *)((const float *)a->x + (int64_t)m * a->ldx)
                                             : (const void *)((const uint16_t *)a->x + (int64_t)m * a->ldx);
            /* max of |x| as unsigned bit patterns: the float order for non-negative values, and a
             * NaN (bits above inf's) wins, where vmaxps would drop it (it returns its second operand) */
            const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
            __m256i vmax = _mm256_setzero_si256();
            for (int k = 0; k < K8; k += 8)
                vmax = _mm256_max_epu32(vmax, _mm256_and_si256(_mm256_castps_si256(load8(a, row, k)), absmask));
            uint32_t tmp[8], bits = 0;
            _mm256_storeu_si256((__m256i *)tmp, vmax);
            for (int i = 0; i < 8; i++) bits = tmp[i] > bits ? tmp[i] : bits;
            for (int k = K8; k < K; k++) {
                uint32_t b = bc_f32_to_bits(load1(a, row, k)) & 0x7fffffffu;
                bits = b > bits ? b : bits;
            }
            float amax = bc_bits_to_f32(bits);
            float s = (amax < 1e-5f ? 1e-5f : amax) / 127.f;
            a->sx[m] = s;
            if (!bc_is_finite(amax)) {  /* the reference's codes of a NaN / inf row: all 0 */
                memset(q, 0, (size_t)K);
                goto codes_done;
            }
            const __m256 sv = _mm256_set1_ps(s), lo = _mm256_set1_ps(-128.f), hi = _mm256_set1_ps(127.f);
            for (int k = 0; k < K8; k += 8) {
                __m256 r = _mm256_round_ps(_mm256_div_ps(load8(a, row, k), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                __m256i v = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
                __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
                _mm_storel_epi64((__m128i *)(q + k), _mm_packs_epi16(p16, p16));
            }
            for (int k = K8; k < K; k++) {
                float r = nearbyintf(load1(a, row, k) / s);
                q[k] = (int8_t)(r < -128.f ? -128 : r > 127.f ? 127 : (int)r);
            }
        }
    codes_done:
        memset(q + K, 0, (size_t)(a->Kp - K));
        if (a->corr) {
            int32_t *c = a->corr + (int64_t)m * a->n_units * 16;
            const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
            for (int u = 0; u < a->n_units; u++) {
                __m256i slo = _mm256_setzero_si256(), shi = _mm256_setzero_si256();
                for (int ch = u * a->unit_chunks; ch < (u + 1) * a->unit_chunks && ch < a->Kp / 64; ch++) {
                    __m256i xlo = _mm256_loadu_si256((const __m256i *)(q + 64 * ch));
                    __m256i xhi = _mm256_loadu_si256((const __m256i *)(q + 64 * ch + 32));
                    slo = _mm256_add_epi32(slo, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, xlo), ones16));
                    shi = _mm256_add_epi32(shi, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, xhi), ones16));
                }
                _mm256_storeu_si256((__m256i *)(c + 16 * u), slo);
                _mm256_storeu_si256((__m256i *)(c + 16 * u + 8), shi);
            }
        }
    }
}
#endif
