// The serving kernels as C++ torch operators (namespace bitcpm_native).
//
// Why: a compiled decode step calls ~200 small layers per token. Through the Python custom
// ops (bitcpm::ternary_linear_packed and friends) each call runs Python (argument checks,
// the prepared-call cache, ctypes) and costs ~40 us, where the GEMV needs a few. Registered
// here with TORCH_LIBRARY, inductor's generated code (Python wrapper, cpp_wrapper=True or
// AOTInductor) calls them through the C++ dispatcher: no Python per layer.
//
// The ops call the ISA-dispatched C kernels of _bitcpm_cpu*.so (csrc/bc_dispatch.c), which
// this library links against; kernels/native.py compiles it on first use. The ISA is an op
// argument (fixed when a graph is built, like PreparedPackedLinear fixes it), so
// BITCOMPILE_ISA keeps its meaning. Numerics are those of the Python ops' C path (same C calls).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

extern "C" {
#include "bc_kernels.h"
int bc_plan_i8(int isa, int group, int Kp, int *unit_chunks);
int bc_plan_dense_i8(int isa);
int bc_isa_supported(int isa);
int bc_linear_i8(const bc_gemm_args *base, const void *x, int64_t ldx, int x_kind, int M, void *out, int isa,
                 int nthreads);
void bc_prep_i8(const bc_prep_args *a, int isa, int nthreads);
void bc_dense_i8(const bc_dense_args *a, int isa, int nthreads);
void bc_dense_f32(const bc_dense_args *a, int isa, int nthreads);
void bc_ew(const bc_ew_args *a, int isa, int nthreads);
}

namespace {

constexpr int64_t kDenseMaxM = 8;         // kernels/cpu/serving.py DENSE_MAX_M
constexpr int64_t kInt8DenseMaxK = 65000;  // (x + 128) * w sums stay within int32
constexpr int64_t kOneDnnMinTokens = 48;   // see onednn_min_tokens

int64_t padded_k(int64_t k) { return (k + BC_PAD_K - 1) / BC_PAD_K * BC_PAD_K; }

int64_t groups_of(int64_t k, int64_t group) { return group > 0 ? (k + group - 1) / group : 1; }

int threads() { return std::max(1, at::get_num_threads()); }

void check_isa(const char *op, int64_t isa) {
    TORCH_CHECK(isa >= 0 && isa <= 2 && bc_isa_supported((int)isa), op, ": ISA id ", isa, " is not supported by this CPU");
}

void check_bias(const char *op, const std::optional<at::Tensor> &bias, int64_t n) {
    if (!bias) return;
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous(), op,
                ": bias must be a contiguous CPU vector of ", n, " values, got shape ", bias->sizes());
}

std::vector<int64_t> out_shape(const at::Tensor &x, int64_t n) {
    auto shape = x.sizes().vec();
    shape.back() = n;
    return shape;
}

// NOTE: from this many tokens on (per-row / per-tensor scales) a layer decodes its 2-bit weights
// into int8 tiles and runs ATen's int8 GEMM (at::_int_mm: oneDNN, with AMX where the CPU has
// it) instead of the packed kernel: the decode (one pass writing K bytes per weight row) is
// then amortized. SmolLM2-135M's 7 layers of a block (K = 576 / 1536), us, packed kernel vs
// this path: 1 thread M = 32 913 / 865, M = 64 1795 / 970, M = 128 3585 / 1458; 2 threads
// M = 32 553 / 607, M = 64 1027 / 893, M = 128 1939 / 1233. kernels/cpu/gemm.py does the same
// from Python for M >= 1024 (where Python's per-tile overhead is amortized too).
int64_t onednn_min_tokens() {
    static const int64_t v = [] {
        const char *e = std::getenv("BITCOMPILE_ONEDNN_MIN_TOKENS");  // for the benchmark's sweep
        return e && *e ? std::max<int64_t>(1, std::atoll(e)) : int64_t{kOneDnnMinTokens};
    }();
    return v;
}

// Per-token absmax int8 activations of the m x k fp32/bf16 rows of contiguous xc, in an
// (m, kp) buffer zero-padded past k, and their fp32 scales (one C pass, bc_prep_i8).
std::pair<at::Tensor, at::Tensor> quantize_rows(const at::Tensor &xc, int64_t m, int64_t k, int64_t kp, int isa) {
    at::Tensor xq = at::empty({m, kp}, xc.options().dtype(at::kChar));
    at::Tensor sx = at::empty({m}, xc.options().dtype(at::kFloat));
    bc_prep_args p;
    std::memset(&p, 0, sizeof p);
    p.M = (int)m, p.K = (int)k, p.Kp = (int)kp, p.x = xc.data_ptr(), p.ldx = k;
    p.x_kind = xc.scalar_type() == at::kFloat ? 0 : 1;
    p.xq = xq.data_ptr<int8_t>(), p.sx = sx.data_ptr<float>(), p.unit_chunks = 1;
    bc_prep_i8(&p, isa, threads());
    return {xq, sx};
}

// Rows of weights decoded per tile: one int8 buffer reused, so a big layer never holds all of
// its int8 weights at once (kernels/cpu/gemm.py DECODE_TILE_ROWS).
constexpr int64_t kDecodeTileRows = 1024;

// y (m, n) = the per-row / per-tensor W1.58A8 product through int8 tiles x at::_int_mm, scaled
// in the packed kernel's order of roundings ((acc * sw[n]) * sx[m] (+ bias[n])): bit-identical.
void ternary_linear_onednn(const at::Tensor &xc, const at::Tensor &packed, const at::Tensor &scales,
                           const std::optional<at::Tensor> &bias, int64_t k, int64_t m, int64_t n, int isa,
                           at::Tensor &y) {
    auto [xq, sx] = quantize_rows(xc, m, k, k, isa);
    at::Tensor bias32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const int64_t rows = std::min(n, kDecodeTileRows);
    at::Tensor tile = at::empty({rows, k}, xq.options());
    for (int64_t n0 = 0; n0 < n; n0 += rows) {
        const int64_t n1 = std::min(n, n0 + rows);
        bc_ew_args u;
        std::memset(&u, 0, sizeof u);
        u.op = BC_EW_UNPACK, u.M = (int)(n1 - n0), u.N = (int)k, u.x = packed.data_ptr<uint8_t>() + n0 * packed.size(1);
        u.ldx = packed.size(1), u.out = tile.data_ptr(), u.ldo = k, u.scalar = 1.f;
        bc_ew(&u, isa, threads());
        at::Tensor acc = at::_int_mm(xq, tile.narrow(0, 0, n1 - n0).t());
        bc_ew_args e;
        std::memset(&e, 0, sizeof e);
        e.op = BC_EW_SCALE, e.M = (int)m, e.N = (int)(n1 - n0), e.x = acc.data_ptr(), e.ldx = acc.stride(0);
        e.x_kind = BC_EW_I32, e.col = scales.data_ptr<float>() + n0, e.row = sx.data_ptr<float>(), e.scalar = 1.f;
        e.bias = bias32.defined() ? bias32.data_ptr<float>() + n0 : nullptr;
        e.out = (char *)y.data_ptr() + n0 * y.element_size(), e.ldo = n, e.out_bf16 = y.scalar_type() == at::kBFloat16;
        bc_ew(&e, isa, threads());
    }
}

// y = x @ (codes * scales)^T (+ bias), W1.58A8: per-token int8 activations, one C call.
at::Tensor ternary_linear_packed(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &scales,
                                 const std::optional<at::Tensor> &bias, int64_t in_features, int64_t group_size,
                                 int64_t isa) {
    const char *op = "bitcpm_native::ternary_linear_packed";
    check_isa(op, isa);
    TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16), op,
                ": activations must be CPU float32/bfloat16, got ", x.scalar_type(), " on ", x.device());
    TORCH_CHECK(in_features > 0 && x.dim() >= 1 && x.size(-1) == in_features, op, ": activations have ",
                x.dim() ? x.size(-1) : 0, " features, the layer takes ", in_features);
    const int64_t kp = padded_k(in_features);
    TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == 2 &&
                    packed.size(1) == kp / 4 && packed.is_contiguous(),
                op, ": packed must be contiguous uint8 (N, ", kp / 4, "), got ", packed.scalar_type(), " ",
                packed.sizes());
    const int64_t n = packed.size(0), g = groups_of(in_features, group_size);
    TORCH_CHECK(group_size >= -1, op, ": group_size must be -1, 0 or > 0, got ", group_size);
    TORCH_CHECK(scales.device().is_cpu() && scales.scalar_type() == at::kFloat && scales.dim() == 2 &&
                    scales.size(0) == n && scales.size(1) == g && scales.is_contiguous(),
                op, ": scales must be contiguous fp32 (", n, ", ", g, "), got ", scales.scalar_type(), " ",
                scales.sizes());
    check_bias(op, bias, n);
    TORCH_CHECK(!bias || bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16, op,
                ": bias must be float32 or bfloat16, got ", bias->scalar_type());
    at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty(out_shape(x, n), x.options());
    const int64_t m = x.numel() / in_features;
    if (m == 0 || n == 0) return y;
    // NOTE: K = 1 is excluded: torch 2.13's CPU _int_mm returns garbage there (kernels/cpu/passes.py)
    if (m >= onednn_min_tokens() && g == 1 && in_features > 1) {
        ternary_linear_onednn(xc, packed, scales, bias, in_features, m, n, (int)isa, y);
        return y;
    }
    int unit_chunks = 1;
    const int run_isa = bc_plan_i8((int)isa, (int)group_size, (int)kp, &unit_chunks);
    bc_gemm_args a;
    std::memset(&a, 0, sizeof a);
    a.M = 0, a.N = (int)n, a.K = (int)in_features, a.Kp = (int)kp, a.group = (int)group_size, a.G = (int)g;
    a.unit_chunks = unit_chunks;
    a.n_units = run_isa != BC_ISA_GENERIC ? (int)((kp / 64 + unit_chunks - 1) / unit_chunks) : 0;
    a.w = packed.data_ptr<uint8_t>();
    a.sw = scales.data_ptr<float>();
    a.bias = bias ? bias->data_ptr() : nullptr;
    a.bias_bf16 = bias && bias->scalar_type() == at::kBFloat16;
    a.ldo = n;
    a.out_bf16 = x.scalar_type() == at::kBFloat16;
    const int kind = x.scalar_type() == at::kFloat ? 0 : 1;
    if (bc_linear_i8(&a, xc.data_ptr(), in_features, kind, (int)m, y.data_ptr(), run_isa, threads()) != 0)
        TORCH_CHECK(false, op, ": no memory for the int8 activations of ", m, " tokens");
    return y;
}

// W8A8 dense layer (the int8 head): per-token int8 activations x per-row int8 weights, fp32 out.
at::Tensor int8_dense_linear(const at::Tensor &x, const at::Tensor &codes, const at::Tensor &scales,
                             const std::optional<at::Tensor> &bias, int64_t isa) {
    const char *op = "bitcpm_native::int8_dense_linear";
    check_isa(op, isa);
    TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kChar && codes.dim() == 2 && codes.stride(1) == 1,
                op, ": codes must be int8 (N, K) with unit stride along K, got ", codes.scalar_type(), " ",
                codes.sizes());
    const int64_t n = codes.size(0), k = codes.size(1);
    TORCH_CHECK(k > 0 && k <= kInt8DenseMaxK, op, ": K must be in 1..", kInt8DenseMaxK, ", got ", k);
    TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                    x.dim() >= 1 && x.size(-1) == k,
                op, ": activations must be CPU float32/bfloat16 (..., ", k, "), got ", x.scalar_type(), " ", x.sizes());
    TORCH_CHECK(scales.device().is_cpu() && scales.scalar_type() == at::kFloat && scales.dim() == 2 &&
                    scales.size(0) == n && scales.size(1) == 1 && scales.is_contiguous(),
                op, ": scales must be contiguous fp32 (", n, ", 1), got ", scales.sizes());
    check_bias(op, bias, n);
    TORCH_CHECK(!bias || bias->scalar_type() == at::kFloat, op, ": bias must be float32, got ", bias->scalar_type());
    at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty(out_shape(x, n), x.options().dtype(at::kFloat));
    const int64_t m = x.numel() / k;
    if (m == 0 || n == 0) return y;
    const int64_t kp = padded_k(k);
    const int run_isa = bc_plan_dense_i8((int)isa);
    auto [xq, sx] = quantize_rows(xc, m, k, kp, run_isa);
    bc_dense_args a;
    std::memset(&a, 0, sizeof a);
    a.M = (int)m, a.N = (int)n, a.K = (int)k, a.ldw = codes.stride(0);
    a.bias = bias ? bias->data_ptr<float>() : nullptr;
    a.out = y.data_ptr<float>(), a.ldo = n;
    a.xq = xq.data_ptr<int8_t>(), a.sx = sx.data_ptr<float>(), a.Kp = (int)kp, a.wq = codes.data_ptr<int8_t>(), a.sw = scales.data_ptr<float>();
    bc_dense_i8(&a, run_isa, threads());
    return y;
}

// fp32 x @ weight^T (+ bias) on all threads for at most kDenseMaxM tokens, at::linear above.
at::Tensor float_gemv_linear(const at::Tensor &x, const at::Tensor &weight, const std::optional<at::Tensor> &bias,
                             int64_t isa) {
    const char *op = "bitcpm_native::float_gemv_linear";
    check_isa(op, isa);
    const int64_t m = x.dim() >= 1 && x.size(-1) ? x.numel() / x.size(-1) : 0;
    const bool gemv = x.device().is_cpu() && weight.device().is_cpu() && x.scalar_type() == at::kFloat &&
                      weight.scalar_type() == at::kFloat && weight.dim() == 2 && weight.stride(1) == 1 &&
                      x.dim() >= 1 && x.size(-1) == weight.size(1) && m > 0 && m <= kDenseMaxM &&
                      weight.size(0) > 0 && weight.size(1) > 0 &&
                      (!bias || (bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                                 bias->size(0) == weight.size(0) && bias->device().is_cpu()));
    if (!gemv) return at::linear(x, weight, bias);  // torch's errors and every other case
    const int64_t n = weight.size(0), k = weight.size(1);
    at::Tensor xc = x.contiguous();
    at::Tensor b = bias ? bias->contiguous() : at::Tensor();
    at::Tensor y = at::empty(out_shape(x, n), x.options());
    bc_dense_args a;
    std::memset(&a, 0, sizeof a);
    a.M = (int)m, a.N = (int)n, a.K = (int)k, a.x = xc.data_ptr<float>(), a.ldx = k;
    a.w = weight.data_ptr<float>(), a.ldw = weight.stride(0), a.bias = bias ? b.data_ptr<float>() : nullptr;
    a.out = y.data_ptr<float>(), a.ldo = n;
    bc_dense_f32(&a, (int)isa, threads());
    return y;
}


// exp(x) for x <= 0 (softmax after subtracting the max), as a branch-free polynomial so that
// the loop over positions vectorizes (std::exp is a scalar libm call): 2^n * p(r), r in
// [-ln2/2, ln2/2], degree-6 Taylor terms, relative error < 2e-7 (tests compare it to SDPA).
inline float exp_nonpositive(float x) {
    x = x < -87.f ? -87.f : x;
    const float n = (x * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23), no libm call
    const float r = x - n * 0.693147181f;
    float p = 1.f / 720;
    p = p * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    int32_t bits;
    std::memcpy(&bits, &p, 4);
    bits += (int32_t)n << 23;
    std::memcpy(&p, &bits, 4);
    return p;
}

// One query row of decode attention: softmax(scale * q.K^T + mask) V over the S cached
// positions of one KV head. fp32 throughout; lanes of 16 keep the dot products vectorizable
// without reassociating. Masked positions get weight 0.
// NOTE: target_clones makes gcc emit an AVX-512, an AVX2 and a baseline copy and pick one at
// load time, the way bc_dispatch picks the GEMV kernels: the op library itself is built
// without -march flags.
__attribute__((target_clones("avx512f", "avx2", "default"), optimize("O3"))) void attend_row(
    const float *__restrict__ q, const float *__restrict__ k, int64_t k_step, const float *__restrict__ v,
    int64_t v_step, const bool *__restrict__ keep, const float *__restrict__ bias, int64_t mask_step, int64_t S,
    int64_t D, float scale, float *__restrict__ scores, float *__restrict__ out) {
    constexpr int L = 16;
    float best = -INFINITY;
    for (int64_t s = 0; s < S; ++s) {
        if (keep && !keep[s * mask_step]) {  // a static cache's unwritten slots: not read at all
            scores[s] = -INFINITY;
            continue;
        }
        const float *ks = k + s * k_step;
        float lanes[L] = {0.f};
        int64_t d = 0;
        for (; d + L <= D; d += L)
            for (int l = 0; l < L; ++l) lanes[l] += q[d + l] * ks[d + l];
        for (; d < D; ++d) lanes[d % L] += q[d] * ks[d];
        for (int w = L / 2; w > 0; w /= 2)  // a tree: an in-order sum of 16 lanes is a 16-add dependency chain
            for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
        const float score = lanes[0] * scale + (bias ? bias[s * mask_step] : 0.f);
        scores[s] = score;
        best = score > best ? score : best;
    }
    for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
    if (best == -INFINITY) return;  // every position masked: zeros, as torch's CPU SDPA gives
    for (int64_t s = 0; s < S; ++s) scores[s] = scores[s] == -INFINITY ? 0.f : exp_nonpositive(scores[s] - best);
    float sums[L] = {0.f};
    int64_t s = 0;
    for (; s + L <= S; s += L)
        for (int l = 0; l < L; ++l) sums[l] += scores[s + l];
    for (; s < S; ++s) sums[s % L] += scores[s];
    for (int w = L / 2; w > 0; w /= 2)
        for (int l = 0; l < w; ++l) sums[l] += sums[l + w];
    const float inv = 1.f / sums[0];
    // four positions per pass over out: one load and store of out per four rows of V, not per row
    constexpr int P = 4;
    for (s = 0; s + P <= S; s += P) {
        const float p0 = scores[s] * inv, p1 = scores[s + 1] * inv, p2 = scores[s + 2] * inv, p3 = scores[s + 3] * inv;
        if (p0 == 0.f && p1 == 0.f && p2 == 0.f && p3 == 0.f) continue;  // masked (unwritten static-cache slots)
        const float *v0 = v + s * v_step, *v1 = v0 + v_step, *v2 = v1 + v_step, *v3 = v2 + v_step;
        for (int64_t d = 0; d < D; ++d) out[d] += (p0 * v0[d] + p1 * v1[d]) + (p2 * v2[d] + p3 * v3[d]);
    }
    for (; s < S; ++s) {
        const float p = scores[s] * inv;
        const float *vs = v + s * v_step;
        if (p != 0.f)
            for (int64_t d = 0; d < D; ++d) out[d] += p * vs[d];
    }
}

// The (sequence, head) rows of one decode_attention call, split over threads.
struct AttentionJob {
    const at::Tensor &q, &k, &v, &mask, &out;
    int64_t B, H, group, S, D;
    float scale;
};

void attention_task(void *ctx, int tid, int nth) {
    const AttentionJob &j = *static_cast<const AttentionJob *>(ctx);
    std::vector<float> scores(j.S);
    const int64_t rows = j.B * j.H, per = (rows + nth - 1) / nth;
    for (int64_t row = tid * per; row < std::min(rows, (tid + 1) * per); ++row) {
        const int64_t b = row / j.H, h = row % j.H;
        const bool *keep = nullptr;
        const float *bias = nullptr;
        int64_t mask_step = 0;
        if (j.mask.defined()) {
            mask_step = j.mask.stride(3);
            const int64_t offset = b * j.mask.stride(0) + h * j.mask.stride(1);
            if (j.mask.scalar_type() == at::kBool)
                keep = j.mask.const_data_ptr<bool>() + offset;
            else
                bias = j.mask.const_data_ptr<float>() + offset;
        }
        attend_row(j.q.const_data_ptr<float>() + b * j.q.stride(0) + h * j.q.stride(1),
                   j.k.const_data_ptr<float>() + b * j.k.stride(0) + (h / j.group) * j.k.stride(1), j.k.stride(2),
                   j.v.const_data_ptr<float>() + b * j.v.stride(0) + (h / j.group) * j.v.stride(1), j.v.stride(2),
                   keep, bias, mask_step, j.S, j.D, j.scale, scores.data(),
                   j.out.data_ptr<float>() + (b * j.H + h) * j.D);
    }
}

// Decode attention over a KV cache without repeating K/V per query head (grouped-query heads
// share their KV head's rows). q (B, H, 1, D); k, v (B, Hkv, S, D) with H a multiple of Hkv;
// mask None, bool (True = attend) or an additive float, broadcastable to (B, H, 1, S).
// Returns (B, 1, H, D), the layout transformers' attention functions return.
at::Tensor decode_attention(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                            const std::optional<at::Tensor> &mask, double scale) {
    const char *op = "bitcpm_native::decode_attention";
    for (const at::Tensor *t : {&q, &k, &v})
        TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 4, op,
                    ": q, k, v must be 4-D CPU float32, got ", t->scalar_type(), " ", t->sizes());
    const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
    TORCH_CHECK(q.size(2) == 1, op, ": one query per sequence (decode), got ", q.size(2));
    TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D, op, ": k and v must be (", B, ", Hkv, S, ",
                D, "), got ", k.sizes(), " and ", v.sizes());
    TORCH_CHECK(Hkv > 0 && H % Hkv == 0, op, ": ", H, " query heads are not a multiple of ", Hkv, " KV heads");
    at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous();
    at::Tensor kc = k.stride(3) == 1 && k.stride(2) >= D ? k : k.contiguous();
    at::Tensor vc = v.stride(3) == 1 && v.stride(2) >= D ? v : v.contiguous();
    at::Tensor m;
    if (mask) {
        TORCH_CHECK(mask->device().is_cpu() && (mask->scalar_type() == at::kBool || mask->scalar_type() == at::kFloat) &&
                        mask->dim() == 4 && mask->size(3) == S && mask->size(2) == 1,
                    op, ": mask must be bool or float32 (B, 1|H, 1, ", S, "), got ", mask->scalar_type(), " ",
                    mask->sizes());
        m = mask->expand({B, H, 1, S});
    }
    at::Tensor out = at::empty({B, 1, H, D}, q.options());
    AttentionJob job{qc, kc, vc, m, out, B, H, H / Hkv, S, D, (float)scale};
    const int nth = (int)std::min<int64_t>(threads(), B * H);
    if (nth > 1)  // bitcompile's spinning pool, the one the layers' kernels use
        bc_run_parallel(attention_task, &job, nth);
    else
        attention_task(&job, 0, 1);
    return out;
}
}  // namespace

TORCH_LIBRARY(bitcpm_native, m) {
    m.def("ternary_linear_packed(Tensor x, Tensor packed, Tensor scales, Tensor? bias, int in_features, "
          "int group_size, int isa) -> Tensor");
    m.def("int8_dense_linear(Tensor x, Tensor codes, Tensor scales, Tensor? bias, int isa) -> Tensor");
    m.def("float_gemv_linear(Tensor x, Tensor weight, Tensor? bias, int isa) -> Tensor");
    m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(bitcpm_native, CPU, m) {
    m.impl("ternary_linear_packed", &ternary_linear_packed);
    m.impl("int8_dense_linear", &int8_dense_linear);
    m.impl("float_gemv_linear", &float_gemv_linear);
    m.impl("decode_attention", &decode_attention);
}
