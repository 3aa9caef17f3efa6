/* AVX-512 (F, BW, VL, DQ) + VNNI kernels.
 *
 * int8 path: weights stay unsigned codes c = q + 1 in {0, 1, 2}, so one vpdpbusd
 * (u8 x s8 -> 4 products summed into each int32 lane) multiplies 64 of them with 64 int8
 * activations; sum c*x = sum q*x + sum x, and the precomputed per-lane activation sums
 * (corr, see bc_kernels.h) remove the "+ sum x" exactly before any float conversion.
 *
 * bc_avx512_gfni.c compiles this file a second time with BC_GFNI = 1 (suffix _gfni): one
 * GF(2) affine instruction then extracts a 2-bit plane instead of a shift and a mask, which
 * took the 4096 x 4096 GEMV from 0.152 to 0.144 ms. CPUs with VNNI but no GFNI (Cascade Lake)
 * run the first build.
 */
#if defined(__x86_64__) || defined(_M_X64)
#ifndef BC_GFNI
#define BC_GFNI 0
#define BC_NAME(name) name
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,gfni")
#endif
#include <immintrin.h>
#include <string.h>

#include "bc_kernels.h"

#define INLINE static inline __attribute__((always_inline))
/* NOTE: bytes between the end of the next weight tile and the lines prefetched now. One tile
 * ahead (a few hundred bytes at K = 576) hid too little DRAM latency: at 4 KiB the 4096 x 4096
 * GEMV went from 66 % to 75 % of the read bandwidth, a decode step's layers 1.8 -> 1.45 ms. */
#define PF_AHEAD 4096

/* codes of plane i (k = 64*i + j) from a 64-byte block; 0, 1, 2 (should not be 3) */
INLINE __m512i plane(__m512i raw, int i) {
    const __m512i m3 = _mm512_set1_epi8(3);
    if (i == 0) return _mm512_and_si512(raw, m3);
#if BC_GFNI
    /* bit matrix: output bit 0 <- input bit 2i, output bit 1 <- input bit 2i+1, others 0 */
    return _mm512_gf2p8affine_epi64_epi8(raw, _mm512_set1_epi64(((long long)(1 << (2 * i)) << 56) | ((long long)(2 << (2 * i)) << 48)), 0);
#else
    return _mm512_and_si512(_mm512_srl_epi16(raw, _mm_cvtsi32_si128(2 * i)), m3);
#endif
}

/* variable-plane form for loops whose plane index is not a constant */
INLINE __m512i plane_var(__m512i raw, int i) {
    return _mm512_and_si512(_mm512_srl_epi16(raw, _mm_cvtsi32_si128(2 * i)), _mm512_set1_epi8(3));
}

/* the 64 codes of tail chunk p (16 bytes, planes of 16): broadcast to 4 lanes, shift lane i by 2i */
INLINE __m512i tail_codes(const uint8_t *p) {
    __m512i raw = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)p));
    return _mm512_and_si512(_mm512_srlv_epi64(raw, _mm512_set_epi64(6, 6, 4, 4, 2, 2, 0, 0)), _mm512_set1_epi8(3));
}

/* the 64 codes of chunk ch of a packed row with nb full blocks */
INLINE __m512i chunk_codes(const uint8_t *w, int ch, int nb) {
    if (ch < 4 * nb) return plane_var(_mm512_loadu_si512(w + 64 * (ch / 4)), ch % 4);
    return tail_codes(w + 64 * nb + BC_TAIL_BYTES * (ch - 4 * nb));
}

/* ---- int8 x i2, one scale column (per row / per tensor): exact int32 sums ---- */
INLINE void tile_i8_row(const bc_gemm_args *a, int m0, int n0, const int MR, const int NR) {
    const int64_t ldw = a->Kp / 4;
    const int nchk = (a->K + BC_CHUNK_K - 1) / BC_CHUNK_K;
    const int nfull = nchk / 4;  /* whole blocks */
    __m512i acc[4][4];
    const uint8_t *wp[4];
    const int8_t *xp[4];
    for (int n = 0; n < NR; n++) wp[n] = a->w + (int64_t)(n0 + n) * ldw;
    for (int m = 0; m < MR; m++) xp[m] = a->xq + (int64_t)(m0 + m) * a->Kp;
    for (int m = 0; m < MR; m++)
        for (int n = 0; n < NR; n++) acc[m][n] = _mm512_setzero_si512();
    /* NOTE: NR rows read side by side defeat the hardware prefetcher; fetch the next tile's
     * rows (contiguous after ours) as one sequential stream, NR lines per block */
    const char *pf = (const char *)(a->w + (int64_t)(n0 + NR) * ldw) + PF_AHEAD;
    const int do_pf = pf + 64 * NR * nfull <= (const char *)(a->w + (int64_t)a->N * ldw);
    for (int b = 0; b < nfull; b++) {
        __m512i raw[4];
        if (do_pf)
            for (int j = 0; j < NR; j++) _mm_prefetch(pf + 64 * (NR * b + j), _MM_HINT_T0);
        for (int n = 0; n < NR; n++) raw[n] = _mm512_loadu_si512(wp[n] + 64 * b);
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            __m512i wv[4];
            for (int n = 0; n < NR; n++) wv[n] = plane(raw[n], i);
            for (int m = 0; m < MR; m++) {
                __m512i xv = _mm512_loadu_si512(xp[m] + 256 * b + 64 * i);
                for (int n = 0; n < NR; n++) acc[m][n] = _mm512_dpbusd_epi32(acc[m][n], wv[n], xv);
            }
        }
    }
    for (int ch = 4 * nfull; ch < nchk; ch++) {  /* tail chunks: decode NR rows, then one x load per m */
        __m512i wv[4];
        for (int n = 0; n < NR; n++) wv[n] = tail_codes(wp[n] + 64 * nfull + BC_TAIL_BYTES * (ch - 4 * nfull));
        for (int m = 0; m < MR; m++) {
            __m512i xv = _mm512_loadu_si512(xp[m] + 64 * ch);
            for (int n = 0; n < NR; n++) acc[m][n] = _mm512_dpbusd_epi32(acc[m][n], wv[n], xv);
        }
    }
    for (int m = 0; m < MR; m++) {
        __m512i cv = _mm512_loadu_si512(a->corr + (int64_t)(m0 + m) * a->n_units * 16);
        for (int n = 0; n < NR; n++) {
            int32_t dot = _mm512_reduce_add_epi32(_mm512_sub_epi32(acc[m][n], cv));
            float y = (float)dot * a->sw[(int64_t)(n0 + n) * a->G];
            bc_store(a, m0 + m, n0 + n, bc_finish_row(a, m0 + m, n0 + n, y));
        }
    }
}

/* ---- int8 x i2 with groups of g (g % 32 == 0): exact int32 per flush unit, then fp32 ---- */
INLINE void tile_i8_group(const bc_gemm_args *a, int m0, int n0, const int MR, const int NR) {
    const int64_t ldw = a->Kp / 4;
    const int nchk = (a->K + BC_CHUNK_K - 1) / BC_CHUNK_K;
    const int g = a->group, uc = a->unit_chunks;
    const int nb = a->Kp / BC_BLOCK_K;
    __m512 facc[4][2];
    const uint8_t *wp[2];
    const float *sw[2];
    for (int n = 0; n < NR; n++) {
        wp[n] = a->w + (int64_t)(n0 + n) * ldw;
        sw[n] = a->sw + (int64_t)(n0 + n) * a->G;
    }
    for (int m = 0; m < MR; m++)
        for (int n = 0; n < NR; n++) facc[m][n] = _mm512_setzero_ps();
    const char *pf = (const char *)(a->w + (int64_t)(n0 + NR) * ldw) + PF_AHEAD;
    const int do_pf = pf + 16 * NR * nchk <= (const char *)(a->w + (int64_t)a->N * ldw);
    for (int u = 0; u * uc < nchk; u++) {
        __m512i acc[4][2];
        for (int m = 0; m < MR; m++)
            for (int n = 0; n < NR; n++) acc[m][n] = _mm512_setzero_si512();
        int ch1 = (u + 1) * uc < nchk ? (u + 1) * uc : nchk;
        for (int ch = u * uc; ch < ch1; ch++) {
            if (do_pf && (ch * NR) % 4 == 0) _mm_prefetch(pf + 64 * (ch * NR / 4), _MM_HINT_T0);  /* see tile_i8_row */
            __m512i wv[2];
            for (int n = 0; n < NR; n++) wv[n] = chunk_codes(wp[n], ch, nb);
            for (int m = 0; m < MR; m++) {
                __m512i xv = _mm512_loadu_si512(a->xq + (int64_t)(m0 + m) * a->Kp + 64 * ch);
                for (int n = 0; n < NR; n++) acc[m][n] = _mm512_dpbusd_epi32(acc[m][n], wv[n], xv);
            }
        }
        /* a unit is one group (g % 64 == 0) or one chunk whose two 32-k halves may be two groups */
        int k0 = 64 * u * uc;
        int glo = k0 / g, ghi = (k0 + 32) / g;
        if (ghi >= a->G) ghi = a->G - 1;  /* padding lanes are 0; any valid scale will do */
        __m512 sv[2];
        for (int n = 0; n < NR; n++)
            sv[n] = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(sw[n][glo]), _mm512_set1_ps(sw[n][ghi]));
        for (int m = 0; m < MR; m++) {
            __m512i cv = _mm512_loadu_si512(a->corr + ((int64_t)(m0 + m) * a->n_units + u) * 16);
            for (int n = 0; n < NR; n++)
                facc[m][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m][n], cv)), sv[n], facc[m][n]);
        }
    }
    for (int m = 0; m < MR; m++)
        for (int n = 0; n < NR; n++)
            bc_store(a, m0 + m, n0 + n, bc_finish_row(a, m0 + m, n0 + n, _mm512_reduce_add_ps(facc[m][n])));
}

#define ROW_CASE(mr, nr) case (mr) * 8 + (nr): tile_i8_row(a, m, n, mr, nr); break;

/* GEMM, one scale column. NOTE: the four activation rows of a tile (16 KiB at K = 4096) stay in
 * L1 while a block of weight rows (<= 256 KiB packed, in L2) passes by. The other order, each
 * weight tile against an L2-resident block of activations, was bound by L2 bandwidth: 16
 * activation lines per 64 dot-product instructions. */
static void gemm_i8_row_blocked(const bc_gemm_args *a, int n0, int n1) {
    int nc = (int)((256 * 1024) / (a->Kp / 4 > 0 ? a->Kp / 4 : 1)) & ~3;
    if (nc < 4) nc = 4;
    for (int nb = n0; nb < n1; nb += nc) {
        int ne = nb + nc < n1 ? nb + nc : n1;
        for (int m = 0; m < a->M; m += 4) {
            int mr = a->M - m < 4 ? a->M - m : 4;
            for (int n = nb; n < ne; n += 4) {
                int nr = ne - n < 4 ? ne - n : 4;
                switch (mr * 8 + nr) {
                ROW_CASE(1, 1) ROW_CASE(1, 2) ROW_CASE(1, 3) ROW_CASE(1, 4)
                ROW_CASE(2, 1) ROW_CASE(2, 2) ROW_CASE(2, 3) ROW_CASE(2, 4)
                ROW_CASE(3, 1) ROW_CASE(3, 2) ROW_CASE(3, 3) ROW_CASE(3, 4)
                ROW_CASE(4, 1) ROW_CASE(4, 2) ROW_CASE(4, 3) ROW_CASE(4, 4)
                }
            }
        }
    }
}
#define GRP_CASE(mr, nr) case (mr) * 8 + (nr): tile_i8_group(a, m, n, mr, nr); break;

void BC_NAME(bc_gemm_i2_i8_avx512)(const bc_gemm_args *a, int n0, int n1) {
    const int grouped = a->group > 0;
    const int NR = grouped ? 2 : 4, MR = 4;
    /* GEMV (M <= 8): every row per weight tile, weights streamed once. GEMM: activation rows
     * blocked to stay in L2 while all weight tiles of this thread's columns pass by. */
    int mc = a->M;
    if (a->M > 8 && !grouped) {
        gemm_i8_row_blocked(a, n0, n1);
        return;
    }
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
                if (!grouped) {
                    switch (mr * 8 + nr) {
                    ROW_CASE(1, 1) ROW_CASE(1, 2) ROW_CASE(1, 3) ROW_CASE(1, 4)
                    ROW_CASE(2, 1) ROW_CASE(2, 2) ROW_CASE(2, 3) ROW_CASE(2, 4)
                    ROW_CASE(3, 1) ROW_CASE(3, 2) ROW_CASE(3, 3) ROW_CASE(3, 4)
                    ROW_CASE(4, 1) ROW_CASE(4, 2) ROW_CASE(4, 3) ROW_CASE(4, 4)
                    }
                } else {
                    switch (mr * 8 + nr) {
                    GRP_CASE(1, 1) GRP_CASE(1, 2) GRP_CASE(2, 1) GRP_CASE(2, 2)
                    GRP_CASE(3, 1) GRP_CASE(3, 2) GRP_CASE(4, 1) GRP_CASE(4, 2)
                    }
                }
            }
        }
    }
}

/* ---- weight-only: fp32 x, masked add of x where q = +1 and subtract where q = -1 ---- */
INLINE void tile_f32(const bc_gemm_args *a, int m0, int n, const int MR) {
    const int64_t ldw = a->Kp / 4;
    const int nchk = (a->K + BC_CHUNK_K - 1) / BC_CHUNK_K;
    const int g = a->group;
    const int nb = a->Kp / BC_BLOCK_K;
    const uint8_t *wp = a->w + (int64_t)n * ldw;
    const float *sw = a->sw + (int64_t)n * a->G;
    const int per_sub = g > 0 && g % 64 != 0;             /* flush every 16 k (g % 16 == 0) */
    const int uc = g > 0 && !per_sub ? g / 64 : nchk;     /* chunks per flush otherwise */
    const __m512i two = _mm512_set1_epi8(2), zero = _mm512_setzero_si512();
    __m512 ap[4], am[4], facc[4];
    for (int m = 0; m < MR; m++) ap[m] = am[m] = facc[m] = _mm512_setzero_ps();
    for (int ch = 0; ch < nchk; ch++) {
        __m512i v = chunk_codes(wp, ch, nb);
        __mmask64 valid = a->K - 64 * ch >= 64 ? ~0ULL : (1ULL << (a->K - 64 * ch)) - 1;
        __mmask64 kp = _mm512_cmpeq_epi8_mask(v, two) & valid, km = _mm512_cmpeq_epi8_mask(v, zero) & valid;
        for (int j = 0; j < 4; j++) {
            __mmask16 p = (__mmask16)(kp >> (16 * j)), q = (__mmask16)(km >> (16 * j));
            int k = 64 * ch + 16 * j;
            if (k >= a->K) break;
            if (per_sub) {
                __m512 s = _mm512_set1_ps(sw[k / g]);
                for (int m = 0; m < MR; m++) {
                    __m512 xv = _mm512_maskz_loadu_ps(p | q, a->xf + (int64_t)(m0 + m) * a->ldxf + k);
                    __m512 t = _mm512_sub_ps(_mm512_maskz_mov_ps(p, xv), _mm512_maskz_mov_ps(q, xv));
                    facc[m] = _mm512_fmadd_ps(t, s, facc[m]);
                }
            } else {
                for (int m = 0; m < MR; m++) {
                    __m512 xv = _mm512_maskz_loadu_ps(p | q, a->xf + (int64_t)(m0 + m) * a->ldxf + k);
                    ap[m] = _mm512_mask_add_ps(ap[m], p, ap[m], xv);
                    am[m] = _mm512_mask_add_ps(am[m], q, am[m], xv);
                }
            }
        }
        if (!per_sub && ((ch + 1) % uc == 0 || ch + 1 == nchk)) {
            __m512 s = _mm512_set1_ps(sw[g > 0 ? (64 * ch) / g : 0]);
            for (int m = 0; m < MR; m++) {
                facc[m] = _mm512_fmadd_ps(_mm512_sub_ps(ap[m], am[m]), s, facc[m]);
                ap[m] = am[m] = _mm512_setzero_ps();
            }
        }
    }
    for (int m = 0; m < MR; m++) {
        float y = _mm512_reduce_add_ps(facc[m]);
        if (a->bias) y = y + bc_bias_at(a, n);
        bc_store(a, m0 + m, n, y);
    }
}

void BC_NAME(bc_gemm_i2_f32_avx512)(const bc_gemm_args *a, int n0, int n1) {
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
INLINE __m512 load16(const bc_prep_args *a, const void *row, int k, __mmask16 mk) {
    __m512 v;
    if (a->x_kind == 0) {
        v = _mm512_maskz_loadu_ps(mk, (const float *)row + k);
    } else {
        __m256i h = _mm256_maskz_loadu_epi16(mk, (const uint16_t *)row + k);
        v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return a->colscale ? _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mk, a->colscale + k)) : v;
}

void BC_NAME(bc_prep_i8_avx512)(const bc_prep_args *a, int m0, int m1) {
    const int K = a->K;
    for (int m = m0; m < m1; m++) {
        int8_t *q = a->xq + (int64_t)m * a->Kp;
        if (a->x_kind == 2) {
            memcpy(q, (const int8_t *)a->x + (int64_t)m * a->ldx, (size_t)K);
        } else {
            const void *row = a->x_kind == 0 ? (const void *)((const float *)a->x + (int64_t)m * a->ldx)
                                             : (const void *)((const uint16_t *)a->x + (int64_t)m * a->ldx);
            /* max of |x| as unsigned bit patterns: the float order for non-negative values, and a
             * NaN (bits above inf's) wins, where vmaxps would drop it (it returns its second operand) */
            __m512i vmax = _mm512_setzero_si512();
            for (int k = 0; k < K; k += 16) {
                __mmask16 mk = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
                vmax = _mm512_max_epu32(vmax, _mm512_castps_si512(_mm512_abs_ps(load16(a, row, k, mk))));
            }
            float amax = bc_bits_to_f32(_mm512_reduce_max_epu32(vmax));
            float s = (amax < 1e-5f ? 1e-5f : amax) / 127.f;
            a->sx[m] = s;
            if (!bc_is_finite(amax)) {  /* the reference's codes of a NaN / inf row: all 0 */
                memset(q, 0, (size_t)K);
                goto codes_done;
            }
            const __m512 sv = _mm512_set1_ps(s), lo = _mm512_set1_ps(-128.f), hi = _mm512_set1_ps(127.f);
            for (int k = 0; k < K; k += 16) {
                __mmask16 mk = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
                __m512 r = _mm512_roundscale_ps(_mm512_div_ps(load16(a, row, k, mk), sv),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
                _mm_mask_storeu_epi8(q + k, mk, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r)));
            }
        }
    codes_done:
        memset(q + K, 0, (size_t)(a->Kp - K));
        if (a->corr) {
            int32_t *c = a->corr + (int64_t)m * a->n_units * 16;
            const __m512i ones = _mm512_set1_epi8(1);
            for (int u = 0; u < a->n_units; u++) {
                __m512i s = _mm512_setzero_si512();
                for (int ch = u * a->unit_chunks; ch < (u + 1) * a->unit_chunks && ch < a->Kp / 64; ch++)
                    s = _mm512_dpbusd_epi32(s, ones, _mm512_loadu_si512(q + 64 * ch));  /* sums of 4 adjacent x */
                _mm512_storeu_si512(c + 16 * u, s);
            }
        }
    }
}
#endif
