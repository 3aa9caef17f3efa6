/* Kernels on the 1.6-bit layout bc_t5_signmag_planar320 v1 (kernels/packing_base3.py has the
 * diagram): five ternary weights per byte, byte = 128 * (V < 0) + |V|, V = sum_i q_i 3^i.
 *
 * The portable kernels unpack a row and share the 2-bit generic kernels' sums; the AVX-512
 * VBMI kernel decodes 64 bytes (320 weights) with two vpermi2b table lookups, two masked
 * subtracts and four ANDs, then runs the 2-bit kernel's arithmetic: unsigned codes c = q + 1 times int8
 * activations with vpdpbusd, minus the activation lane sums (corr) — the same exact int32
 * dot and the same float roundings, so results equal the 2-bit kernel's bit for bit.
 */
#include <stdlib.h>
#include <string.h>

#include "bc_kernels.h"

/* balanced-ternary digit i (0..4) of m in [0, 121] */
static int digit_of(int m, int i) {
    for (int j = 0; j < i; j++) {
        int d = (m + 1) % 3 - 1;
        m = (m - d) / 3;
    }
    return (m + 1) % 3 - 1;
}

/* Unpack row n (Kp / 5 bytes) into q[0..Kp) in {-1, 0, 1}. */
static void unpack_row_t5(const uint8_t *wrow, int Kp, int8_t *q) {
    static int8_t digits[128][5];
    static int ready = 0;
    if (!__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) {  /* idempotent: racing threads write the same values */
        for (int m = 0; m < 128; m++)
            for (int i = 0; i < 5; i++) digits[m][i] = (int8_t)(m <= 121 ? digit_of(m, i) : 0);
        __atomic_store_n(&ready, 1, __ATOMIC_RELEASE);
    }
    for (int b = 0; b < Kp / BC_T5_BLOCK_K; b++) {
        const uint8_t *blk = wrow + 64 * b;
        int8_t *qb = q + BC_T5_BLOCK_K * b;
        for (int j = 0; j < 64; j++) {
            int sign = blk[j] & 128 ? -1 : 1;
            for (int i = 0; i < 5; i++) qb[64 * i + j] = (int8_t)(sign * digits[blk[j] & 127][i]);
        }
    }
}

static int32_t dot_i8(const int8_t *x, const int8_t *q, int n) {
    int32_t s = 0;
    for (int k = 0; k < n; k++) s += (int32_t)x[k] * q[k];
    return s;
}

static float dot_f32(const float *x, const int8_t *q, int n) {
    float s = 0.f;
    for (int k = 0; k < n; k++) s += x[k] * (float)q[k];
    return s;
}

/* the same sums and roundings as bc_gemm_i2_i8_generic */
void bc_gemm_t5_i8_generic(const bc_gemm_args *a, int n0, int n1) {
    int8_t *q = malloc((size_t)a->Kp + 64);
    if (!q) abort();
    int g = a->group > 0 ? a->group : a->K;
    for (int n = n0; n < n1; n++) {
        unpack_row_t5(a->w + (int64_t)n * (a->Kp / 5), a->Kp, q);
        const float *sw = a->sw + (int64_t)n * a->G;
        for (int m = 0; m < a->M; m++) {
            const int8_t *x = a->xq + (int64_t)m * a->Kp;
            float y;
            if (a->group <= 0) {
                y = (float)dot_i8(x, q, a->K) * sw[0];
            } else {
                y = 0.f;
                for (int k0 = 0, gi = 0; k0 < a->K; k0 += g, gi++) {
                    int len = a->K - k0 < g ? a->K - k0 : g;
                    y += (float)dot_i8(x + k0, q + k0, len) * sw[gi];
                }
            }
            bc_store(a, m, n, bc_finish_row(a, m, n, y));
        }
    }
    free(q);
}

/* the same sums and roundings as bc_gemm_i2_f32_generic */
void bc_gemm_t5_f32_generic(const bc_gemm_args *a, int n0, int n1) {
    int8_t *q = malloc((size_t)a->Kp + 64);
    if (!q) abort();
    int g = a->group > 0 ? a->group : (a->K > 0 ? a->K : 1);
    for (int n = n0; n < n1; n++) {
        unpack_row_t5(a->w + (int64_t)n * (a->Kp / 5), a->Kp, q);
        const float *sw = a->sw + (int64_t)n * a->G;
        for (int m = 0; m < a->M; m++) {
            const float *x = a->xf + (int64_t)m * a->ldxf;
            float y = 0.f;
            for (int k0 = 0, gi = 0; k0 < a->K; k0 += g, gi++) {
                int len = a->K - k0 < g ? a->K - k0 : g;
                y += dot_f32(x + k0, q + k0, len) * sw[a->group > 0 ? gi : 0];
            }
            if (a->bias) y = y + bc_bias_at(a, n);
            bc_store(a, m, n, y);
        }
    }
    free(q);
}

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx2,fma")
#include <immintrin.h>

#define INLINE static inline __attribute__((always_inline))
#define PF_AHEAD 4096  /* as in bc_avx512.c: prefetch the next tile's rows this far ahead */

/* The two 128-entry tables, indexed by |V| (bits 0..6 of a byte; vpermi2b ignores bit 7):
 * four_codes[m] = c_0 | c_1 << 2 | c_2 << 4 | c_3 << 6 and fifth_code[m] = c_4, c_i = q_i + 1. */
typedef struct {
    uint8_t four_codes[128], fifth_code[128];
} t5_tables;

static const t5_tables *tables(void) {
    static t5_tables t;
    static int ready = 0;
    if (!__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) {
        for (int m = 0; m < 128; m++) {
            int v = m <= 121 ? m : 0, four = 0;
            for (int i = 0; i < 4; i++) four |= (digit_of(v, i) + 1) << (2 * i);
            t.four_codes[m] = (uint8_t)four;
            t.fifth_code[m] = (uint8_t)(digit_of(v, 4) + 1);
        }
        __atomic_store_n(&ready, 1, __ATOMIC_RELEASE);
    }
    return &t;
}

/* The five weight planes of one 64-byte block, as vpdpbusd operands. A set bit 7 negates all
 * five weights: c -> 2 - c, which is 0xAA - byte for four 2-bit fields (no field borrows).
 * NOTE: planes 1..3 stay in place, scaled: (four & 0x0C) = 4 c_1, (four & 0x30) = 16 c_2,
 * (four & 0xC0) = 64 c_3 (at most 128: still an unsigned byte). Their dot products go to
 * their own accumulators, which are divided exactly (shifted) at the end: an AND per plane
 * (ports 0 and 5) instead of a shift (port 0, with vpdpbusd), measured faster than GFNI. */
INLINE void decode_block(__m512i raw, const __m512i tab[4], __m512i c[5]) {
    __mmask64 neg = _mm512_movepi8_mask(raw);
    __m512i four = _mm512_permutex2var_epi8(tab[0], raw, tab[1]);
    four = _mm512_mask_sub_epi8(four, neg, _mm512_set1_epi8((char)0xAA), four);
    __m512i fifth = _mm512_permutex2var_epi8(tab[2], raw, tab[3]);
    c[4] = _mm512_mask_sub_epi8(fifth, neg, _mm512_set1_epi8(2), fifth);
    c[0] = _mm512_and_si512(four, _mm512_set1_epi8(0x03));
    c[1] = _mm512_and_si512(four, _mm512_set1_epi8(0x0C));
    c[2] = _mm512_and_si512(four, _mm512_set1_epi8(0x30));
    c[3] = _mm512_and_si512(four, _mm512_set1_epi8((char)0xC0));
}

/* one scale column (per row / per tensor): exact int32 dots of MR activation rows x NR weight
 * rows; acc[.][.][s] holds 4^s times the sums of plane s (planes 0 and 4 share s = 0) */
INLINE void tile_t5(const bc_gemm_args *a, const __m512i tab[4], int m0, int n0, const int MR, const int NR) {
    const int64_t ldw = a->Kp / 5;
    const int nblk = a->Kp / BC_T5_BLOCK_K;
    __m512i acc[2][4][4];
    const uint8_t *wp[4];
    const int8_t *xp[2];
    for (int n = 0; n < NR; n++) wp[n] = a->w + (int64_t)(n0 + n) * ldw;
    for (int m = 0; m < MR; m++) xp[m] = a->xq + (int64_t)(m0 + m) * a->Kp;
    for (int m = 0; m < MR; m++)
        for (int n = 0; n < NR; n++)
            for (int p = 0; p < 4; p++) acc[m][n][p] = _mm512_setzero_si512();
    /* NOTE: as in bc_avx512.c, NR rows read side by side defeat the hardware prefetcher */
    const char *pf = (const char *)(a->w + (int64_t)(n0 + NR) * ldw) + PF_AHEAD;
    const int do_pf = pf + 64 * NR * nblk <= (const char *)(a->w + (int64_t)a->N * ldw);
    for (int b = 0; b < nblk; b++) {
        if (do_pf)
            for (int j = 0; j < NR; j++) _mm_prefetch(pf + 64 * (NR * b + j), _MM_HINT_T0);
        for (int n = 0; n < NR; n++) {
            __m512i c[5];
            decode_block(_mm512_loadu_si512(wp[n] + 64 * b), tab, c);
            for (int m = 0; m < MR; m++) {
                const int8_t *x = xp[m] + BC_T5_BLOCK_K * b;
                acc[m][n][0] = _mm512_dpbusd_epi32(acc[m][n][0], c[0], _mm512_loadu_si512(x));
                acc[m][n][1] = _mm512_dpbusd_epi32(acc[m][n][1], c[1], _mm512_loadu_si512(x + 64));
                acc[m][n][2] = _mm512_dpbusd_epi32(acc[m][n][2], c[2], _mm512_loadu_si512(x + 128));
                acc[m][n][3] = _mm512_dpbusd_epi32(acc[m][n][3], c[3], _mm512_loadu_si512(x + 192));
                acc[m][n][0] = _mm512_dpbusd_epi32(acc[m][n][0], c[4], _mm512_loadu_si512(x + 256));
            }
        }
    }
    for (int m = 0; m < MR; m++) {
        __m512i cv = _mm512_loadu_si512(a->corr + (int64_t)(m0 + m) * a->n_units * 16);
        for (int n = 0; n < NR; n++) {
            /* every lane of acc[s] is 4^s times an integer: the shifts are exact */
            __m512i sum = _mm512_add_epi32(_mm512_add_epi32(acc[m][n][0], _mm512_srai_epi32(acc[m][n][1], 2)),
                                           _mm512_add_epi32(_mm512_srai_epi32(acc[m][n][2], 4), _mm512_srai_epi32(acc[m][n][3], 6)));
            int32_t dot = _mm512_reduce_add_epi32(_mm512_sub_epi32(sum, cv));
            float y = (float)dot * a->sw[(int64_t)(n0 + n) * a->G];
            bc_store(a, m0 + m, n0 + n, bc_finish_row(a, m0 + m, n0 + n, y));
        }
    }
}

#define T5_CASE(mr, nr) case (mr) * 8 + (nr): tile_t5(a, tab, m, n, mr, nr); break;

/* Per row / per tensor only (bc_plan_t5_i8 sends groups to the generic kernel). GEMM: activation
 * rows blocked to stay in L2 while the weight rows of this range pass by. */
void bc_gemm_t5_i8_avx512_vbmi(const bc_gemm_args *a, int n0, int n1) {
    const t5_tables *t = tables();
    const __m512i tab[4] = {
        _mm512_loadu_si512(t->four_codes), _mm512_loadu_si512(t->four_codes + 64),
        _mm512_loadu_si512(t->fifth_code), _mm512_loadu_si512(t->fifth_code + 64),
    };
    /* 16 accumulators per tile: GEMV four weight rows, GEMM two activation x two weight rows */
    const int MR = a->M == 1 ? 1 : 2, NR = a->M == 1 ? 4 : 2;
    int mc = a->M;
    if (a->M > 8) {
        mc = (int)((384 * 1024) / (a->Kp > 0 ? a->Kp : 1)) & ~3;
        if (mc < 4) mc = 4;
    }
    for (int mb = 0; mb < a->M; mb += mc) {
        int me = mb + mc < a->M ? mb + mc : a->M;
        for (int n = n0; n < n1; n += NR) {
            int nr = n1 - n < NR ? n1 - n : NR;
            for (int m = mb; m < me; m += MR) {
                int mr = me - m < MR ? me - m : MR;
                switch (mr * 8 + nr) {
                T5_CASE(1, 1) T5_CASE(1, 2) T5_CASE(1, 3) T5_CASE(1, 4)
                T5_CASE(2, 1) T5_CASE(2, 2)
                }
            }
        }
    }
}
#pragma GCC pop_options
#endif
