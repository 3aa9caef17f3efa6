/* Ternary CPU kernels of bitcompile: shared declarations.
 *
 * Weights use the packed layout bc_i2_planar256_t64 v2 (kernels/packing.py has the diagram):
 * row n is Kp/4 bytes, Kp = K rounded up to 64: nb = Kp/256 full blocks, then
 * t = (Kp%256)/64 tail chunks. Byte j of 64-byte block b holds the 2-bit codes c = q + 1
 * of k = 256*b + 64*i + j at bits 2i..2i+1; byte j (0..15) of the 16-byte tail chunk c
 * (row offset 64*nb + 16*c) holds k = 256*nb + 64*c + 16*i + j. A 64-k "chunk" is one
 * plane of one block or one tail chunk: chunk ch covers k = 64*ch .. 64*ch + 63.
 *
 * Names follow bc_<op>_<wtype>_<atype>_<isa> (i2 = 2-bit ternary, i8 = int8, f32).
 */
#ifndef BC_KERNELS_H
#define BC_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define BC_BLOCK_K 256
#define BC_CHUNK_K 64
#define BC_PAD_K 64      /* rows are padded to a multiple of this */
#define BC_TAIL_BYTES 16 /* bytes of one tail chunk */

enum { BC_ISA_GENERIC = 0, BC_ISA_AVX2 = 1, BC_ISA_AVX512 = 2 };

/* One GEMM call: y[m, n] = sx[m] * sum_g sw[n, g] * sum_{k in g} q_w[n, k] * x[m, k] (+ bias[n]).
 * group: -1 per row, 0 per tensor (both: one scale column), g > 0 groups of g along K. */
typedef struct {
    int M, N, K, Kp, group, G;   /* G = number of scale columns */
    /* int8 path: activations padded with zeros to Kp, row stride Kp */
    const int8_t *xq;
    const float *sx;
    /* corr[m, u, 0..15]: per-lane sums of xq over the chunks of flush unit u (SIMD paths) */
    const int32_t *corr;
    int unit_chunks, n_units;
    /* float path: fp32 activations, row stride ldxf, valid up to K */
    const float *xf;
    int64_t ldxf;
    const uint8_t *w;            /* N x Kp/4 */
    const float *sw;             /* N x G */
    const void *bias;            /* N fp32 (bf16 when bias_bf16) or NULL */
    void *out;                   /* M x N, row stride ldo elements */
    int64_t ldo;
    int out_bf16;
    int bias_bf16;               /* read the model's bf16 bias as it is: no fp32 copy to go stale */
    int layout;                  /* BC_LAYOUT_I2 (w is N x Kp/4) or BC_LAYOUT_T5 (w is N x Kp/5, Kp % 320 == 0) */
} bc_gemm_args;

/* Packed weight layouts: the canonical 2-bit one above, and the 1.6-bit one of
 * kernels/packing_base3.py (bc_t5_signmag_planar320 v1): byte j of 64-byte block b holds the
 * weights k = 320*b + 64*i + j (i = 0..4) as 128*(V < 0) + |V|, V = sum_i q_i * 3^i. */
enum { BC_LAYOUT_I2 = 0, BC_LAYOUT_T5 = 1 };
#define BC_T5_BLOCK_K 320

/* Kernel signature: compute output columns [n0, n1) for every row m. */
typedef void (*bc_gemm_fn)(const bc_gemm_args *a, int n0, int n1);

/* Quantize / copy activations: xq (M x Kp, zero padded), sx (M), corr (M x n_units x 16) if non-NULL. */
typedef struct {
    int M, K, Kp;
    const void *x;               /* fp32 or bf16 (quantize) or int8 (copy) */
    int64_t ldx;                 /* row stride in elements */
    int x_kind;                  /* 0 fp32, 1 bf16, 2 int8 (already quantized) */
    int8_t *xq;
    float *sx;                   /* written when quantizing */
    int32_t *corr;
    int unit_chunks, n_units;
    const float *colscale;       /* K or NULL: quantize x[m, k] * colscale[k] (fp32 product) */
} bc_prep_args;

typedef void (*bc_prep_fn)(const bc_prep_args *a, int m0, int m1);

/* Dense y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for the layers a packed model keeps
 * out of ternary (the tied lm_head): fp32 x fp32, or int8 x int8 (W8A8, y = sx[m] * sw[n] *
 * exact int32 dot, the per-token activation quantizer of the ternary layers). */
typedef struct {
    int M, N, K;
    const float *x;              /* fp32 path */
    int64_t ldx;
    const float *w;              /* fp32 path: N x K, row stride ldw */
    int64_t ldw;
    const float *bias;           /* N or NULL */
    float *out;
    int64_t ldo;
    /* int8 path: xq M x Kp (zero padded, Kp = K rounded up to 64), wq N x K (row stride ldw),
     * xsum[m] = sum_k xq[m, k]: the AVX-512 kernel feeds w + 128 as unsigned bytes (bc_dense_i8
     * fills it) */
    const int8_t *xq;
    const float *sx;
    int Kp;
    const int8_t *wq;
    const float *sw;
    const int32_t *xsum;
} bc_dense_args;

typedef void (*bc_dense_fn)(const bc_dense_args *a, int n0, int n1);

/* One elementwise pass over an M x N matrix (row strides ldx, ldo in elements), rows split
 * over threads. BC_EW_SCALE: out = ((x * col[n]) * row[m]) * scalar (+ bias[n]), fp32 or bf16
 * out (col, row, bias may be NULL). BC_EW_TERNARY: fp32 x, out int8 codes
 * clamp(round(x / row[m]), -1, 1). BC_EW_UNPACK: x = M packed 2-bit rows of ldx bytes, out
 * the int8 codes of their first N values of k. */
enum { BC_EW_SCALE = 0, BC_EW_TERNARY = 1, BC_EW_UNPACK = 2 };
enum { BC_EW_F32 = 0, BC_EW_BF16 = 1, BC_EW_I8 = 2, BC_EW_I32 = 3 };
typedef struct {
    int op, M, N;
    const void *x;
    int64_t ldx;
    int x_kind;
    const float *col, *row;
    float scalar;
    const float *bias;
    void *out;
    int64_t ldo;
    int out_bf16;
} bc_ew_args;

typedef void (*bc_ew_fn)(const bc_ew_args *a, int m0, int m1);

/* The structs above, by id, for bc_struct_size (Python checks its ctypes mirrors against it). */
enum { BC_STRUCT_GEMM = 0, BC_STRUCT_PREP = 1, BC_STRUCT_DENSE = 2, BC_STRUCT_EW = 3 };

/* One parallel call: fn(ctx, tid, nth) takes its work from a shared counter in ctx (bc_dispatch.c). */
typedef void (*bc_task)(void *ctx, int tid, int nth);
void bc_run_parallel(bc_task fn, void *ctx, int nth);
int bc_isa_supported(int isa);

/* Which group modes a SIMD int8 / float kernel handles (others run the generic kernel). */
typedef int (*bc_supports_fn)(int group);

/* generic C (every architecture) */
void bc_gemm_i2_i8_generic(const bc_gemm_args *a, int n0, int n1);
void bc_gemm_i2_f32_generic(const bc_gemm_args *a, int n0, int n1);
void bc_prep_i8_generic(const bc_prep_args *a, int m0, int m1);
void bc_pack_i2_generic(const int8_t *q, int64_t ldq, int N, int K, uint8_t *out, int n0, int n1);
void bc_dense_f32_generic(const bc_dense_args *a, int n0, int n1);
void bc_dense_i8_generic(const bc_dense_args *a, int n0, int n1);
void bc_ew_generic(const bc_ew_args *a, int m0, int m1);
void bc_gemm_t5_i8_generic(const bc_gemm_args *a, int n0, int n1);
void bc_gemm_t5_f32_generic(const bc_gemm_args *a, int n0, int n1);

#if defined(__x86_64__) || defined(_M_X64)
void bc_gemm_i2_i8_avx2(const bc_gemm_args *a, int n0, int n1);
void bc_gemm_i2_f32_avx2(const bc_gemm_args *a, int n0, int n1);
void bc_prep_i8_avx2(const bc_prep_args *a, int m0, int m1);
void bc_gemm_i2_i8_avx512(const bc_gemm_args *a, int n0, int n1);
void bc_gemm_i2_f32_avx512(const bc_gemm_args *a, int n0, int n1);
void bc_prep_i8_avx512(const bc_prep_args *a, int m0, int m1);
void bc_gemm_i2_i8_avx512_gfni(const bc_gemm_args *a, int n0, int n1);
void bc_dense_f32_avx2(const bc_dense_args *a, int n0, int n1);
void bc_dense_f32_avx512(const bc_dense_args *a, int n0, int n1);
void bc_dense_i8_avx512(const bc_dense_args *a, int n0, int n1);
void bc_ew_avx2(const bc_ew_args *a, int m0, int m1);
void bc_ew_avx512(const bc_ew_args *a, int m0, int m1);
void bc_gemm_t5_i8_avx512_vbmi(const bc_gemm_args *a, int n0, int n1);
#endif

/* helpers shared by the kernels */

/* 2-bit code c (0..2) of k in a packed row with nb full blocks */
static inline int bc_code_at(const uint8_t *w, int k, int nb) {
    if (k < BC_BLOCK_K * nb) return (w[64 * (k / 256) + k % 64] >> (2 * ((k % 256) / 64))) & 3;
    int r = k - BC_BLOCK_K * nb;
    return (w[64 * nb + BC_TAIL_BYTES * (r / 64) + r % 16] >> (2 * ((r % 64) / 16))) & 3;
}
static inline uint16_t bc_f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = { f };
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);  /* quiet NaN */
    v.u += 0x7fffu + ((v.u >> 16) & 1u);  /* round to nearest even, as torch does */
    return (uint16_t)(v.u >> 16);
}

static inline uint32_t bc_f32_to_bits(float f) {
    union { float f; uint32_t u; } v = { f };
    return v.u;
}
static inline float bc_bits_to_f32(uint32_t u) {
    union { uint32_t u; float f; } v = { u };
    return v.f;
}
/* neither NaN nor +-inf (by the bits: exact whatever the compiler's float flags) */
static inline int bc_is_finite(float f) { return (bc_f32_to_bits(f) & 0x7fffffffu) < 0x7f800000u; }

static inline float bc_bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

static inline float bc_bias_at(const bc_gemm_args *a, int n) {
    return a->bias_bf16 ? bc_bf16_to_f32(((const uint16_t *)a->bias)[n]) : ((const float *)a->bias)[n];
}

static inline void bc_store(const bc_gemm_args *a, int m, int n, float y) {
    if (a->out_bf16) ((uint16_t *)a->out)[(int64_t)m * a->ldo + n] = bc_f32_to_bf16(y);
    else ((float *)a->out)[(int64_t)m * a->ldo + n] = y;
}

/* y = ((float)acc * sw) * sx (+ bias): the reference's order of roundings (per row / tensor). */
static inline float bc_finish_row(const bc_gemm_args *a, int m, int n, float dot_scaled) {
    float y = dot_scaled * a->sx[m];
    if (a->bias) y = y + bc_bias_at(a, n);
    return y;
}

#endif
