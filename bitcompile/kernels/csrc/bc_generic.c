/* Portable C kernels: the fallback on every architecture and the C-level oracle the SIMD
 * kernels are tested against (through the Python tests, bit for bit on integer sums). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bc_kernels.h"

#define BC_GEN_ROWS 4  /* activation rows that share one unpacked weight row */

/* Unpack row n of the packed weight into q[0..Kp) in {-1, 0, 1}. */
static void unpack_row(const uint8_t *wrow, int Kp, int8_t *q) {
    int nb = Kp / BC_BLOCK_K;
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = wrow + 64 * b;
        int8_t *qb = q + BC_BLOCK_K * b;
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 64; j++) qb[64 * i + j] = (int8_t)((blk[j] >> (2 * i)) & 3) - 1;
    }
    for (int c = 0; c < (Kp % BC_BLOCK_K) / BC_CHUNK_K; c++) {  /* tail chunks: planes of 16 */
        const uint8_t *blk = wrow + 64 * nb + BC_TAIL_BYTES * c;
        int8_t *qb = q + BC_BLOCK_K * nb + BC_CHUNK_K * c;
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 16; j++) qb[16 * i + j] = (int8_t)((blk[j] >> (2 * i)) & 3) - 1;
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

void bc_gemm_i2_i8_generic(const bc_gemm_args *a, int n0, int n1) {
    int8_t *q = malloc((size_t)a->Kp + 64);
    if (!q) abort();
    int g = a->group > 0 ? a->group : a->K;
    for (int n = n0; n < n1; n++) {
        unpack_row(a->w + (int64_t)n * (a->Kp / 4), a->Kp, q);
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

void bc_gemm_i2_f32_generic(const bc_gemm_args *a, int n0, int n1) {
    int8_t *q = malloc((size_t)a->Kp + 64);
    if (!q) abort();
    int g = a->group > 0 ? a->group : (a->K > 0 ? a->K : 1);
    for (int n = n0; n < n1; n++) {
        unpack_row(a->w + (int64_t)n * (a->Kp / 4), a->Kp, q);
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

/* Per-lane sums of the zero-padded int8 row xq over the chunks of each flush unit. */
static void row_corr(const int8_t *xq, int Kp, int unit_chunks, int n_units, int32_t *corr) {
    int nch = Kp / BC_CHUNK_K;
    memset(corr, 0, sizeof(int32_t) * 16 * (size_t)n_units);
    for (int ch = 0; ch < nch; ch++) {
        int32_t *c = corr + 16 * (ch / unit_chunks);
        const int8_t *x = xq + BC_CHUNK_K * ch;
        for (int l = 0; l < 16; l++) c[l] += x[4 * l] + x[4 * l + 1] + x[4 * l + 2] + x[4 * l + 3];
    }
}

void bc_prep_i8_generic(const bc_prep_args *a, int m0, int m1) {
    for (int m = m0; m < m1; m++) {
        int8_t *q = a->xq + (int64_t)m * a->Kp;
        if (a->x_kind == 2) {
            memcpy(q, (const int8_t *)a->x + (int64_t)m * a->ldx, (size_t)a->K);
        } else {
            const float *xf = (const float *)a->x + (int64_t)m * a->ldx;
            const uint16_t *xh = (const uint16_t *)a->x + (int64_t)m * a->ldx;
#define BC_XK(k) ((a->x_kind == 0 ? xf[k] : bc_bf16_to_f32(xh[k])) * (a->colscale ? a->colscale[k] : 1.f))
            float amax = 0.f;
            for (int k = 0; k < a->K; k++) {
                float v = fabsf(BC_XK(k));
                amax = v > amax || isnan(v) ? v : amax;
            }
            /* s = max(amax, eps) / 127 in fp32; q = clamp(round_half_even(x / s)) as torch computes it */
            float s = (amax < 1e-5f ? 1e-5f : amax) / 127.f;
            a->sx[m] = s;
            /* a NaN / inf row: codes 0 (x / s is NaN or 0 there; the reference defines NaN -> 0) */
            if (!bc_is_finite(amax)) memset(q, 0, (size_t)a->K);
            else for (int k = 0; k < a->K; k++) {
                float r = nearbyintf(BC_XK(k) / s);
                q[k] = (int8_t)(r < -128.f ? -128 : r > 127.f ? 127 : (int)r);
            }
#undef BC_XK
        }
        memset(q + a->K, 0, (size_t)(a->Kp - a->K));
        if (a->corr) row_corr(q, a->Kp, a->unit_chunks, a->n_units, a->corr + (int64_t)m * a->n_units * 16);
    }
}

/* Pack ternary rows n0..n1 of q (N x K, values in {-1,0,1}, row stride ldq) into bc_i2_planar256_t64. */
void bc_pack_i2_generic(const int8_t *q, int64_t ldq, int N, int K, uint8_t *out, int n0, int n1) {
    int Kp = (K + BC_PAD_K - 1) / BC_PAD_K * BC_PAD_K;
    int nb = Kp / BC_BLOCK_K;
    (void)N;
    for (int n = n0; n < n1; n++) {
        const int8_t *row = q + (int64_t)n * ldq;
        uint8_t *o = out + (int64_t)n * (Kp / 4);
        for (int b = 0; b < nb; b++) {
            for (int j = 0; j < 64; j++) {
                uint8_t byte = 0;
                for (int i = 0; i < 4; i++) {
                    int k = BC_BLOCK_K * b + 64 * i + j;
                    int c = k < K ? row[k] + 1 : 1;  /* pad with the zero weight */
                    byte |= (uint8_t)(c << (2 * i));
                }
                o[64 * b + j] = byte;
            }
        }
        for (int c = 0; c < (Kp % BC_BLOCK_K) / BC_CHUNK_K; c++) {
            for (int j = 0; j < 16; j++) {
                uint8_t byte = 0;
                for (int i = 0; i < 4; i++) {
                    int k = BC_BLOCK_K * nb + BC_CHUNK_K * c + 16 * i + j;
                    int cc = k < K ? row[k] + 1 : 1;
                    byte |= (uint8_t)(cc << (2 * i));
                }
                o[64 * nb + BC_TAIL_BYTES * c + j] = byte;
            }
        }
    }
}
