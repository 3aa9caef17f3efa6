/* Entry points called from Python (ctypes): run-time ISA choice and a small thread pool.
 *
 * The ISA is picked once from cpuid + xgetbv (the OS must save the wider registers), and
 * can be forced per call (BITCOMPILE_ISA, read by kernels/cpu.py). Work is split over N
 * (output features) for the GEMMs and over M (tokens) for activation quantization.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bc_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define BC_X86 1
#endif

/* ---------------------------------------------------------------- ABI check */

/* sizeof of each struct Python fills through ctypes (kernels/cpu refuses a library whose
 * sizes differ from its ctypes mirrors: a field added on one side only would shift every
 * field after it); 0 for an unknown id. */
size_t bc_struct_size(int which) {
    switch (which) {
    case BC_STRUCT_GEMM: return sizeof(bc_gemm_args);
    case BC_STRUCT_PREP: return sizeof(bc_prep_args);
    case BC_STRUCT_DENSE: return sizeof(bc_dense_args);
    case BC_STRUCT_EW: return sizeof(bc_ew_args);
    default: return 0;
    }
}

/* ---------------------------------------------------------------- ISA detection */

static int isa_probe(int isa) {
    if (isa == BC_ISA_GENERIC) return 1;
#ifdef BC_X86
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1;
    if (!osxsave || !avx || !fma) return 0;
    unsigned xlo, xhi;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    if ((xlo & 0x6) != 0x6) return 0;  /* OS saves XMM and YMM state */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    int avx2 = (b >> 5) & 1;
    if (isa == BC_ISA_AVX2) return avx2;
    if (isa == BC_ISA_AVX512) {
        int f = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1, vnni = (c >> 11) & 1;
        return avx2 && f && dq && bw && vl && vnni && (xlo & 0xe6) == 0xe6;  /* + opmask, ZMM state */
    }
#endif
    return 0;
}

/* NOTE: cached, because cpuid traps to the hypervisor in a VM (measured ~15 us per call). */
int bc_isa_supported(int isa) {
    static atomic_int cache[3] = { -1, -1, -1 };
    if (isa < 0 || isa > 2) return 0;
    int v = atomic_load(&cache[isa]);
    if (v < 0) {
        v = isa_probe(isa);
        atomic_store(&cache[isa], v);
    }
    return v;
}

int bc_best_isa(void) {
    if (bc_isa_supported(BC_ISA_AVX512)) return BC_ISA_AVX512;
    if (bc_isa_supported(BC_ISA_AVX2)) return BC_ISA_AVX2;
    return BC_ISA_GENERIC;
}

/* The ISA whose int8 kernel runs for this group mode, and its flush unit (in 64-k chunks). */
int bc_plan_i8(int isa, int group, int Kp, int *unit_chunks) {
    int nch = Kp / BC_CHUNK_K;
    *unit_chunks = nch > 0 ? nch : 1;
    if (group <= 0) return isa;
    if (group % 64 == 0 && isa != BC_ISA_GENERIC) {
        *unit_chunks = group / 64;
        return isa;
    }
    if (group % 32 == 0 && isa == BC_ISA_AVX512) {
        *unit_chunks = 1;
        return isa;
    }
    return BC_ISA_GENERIC;
}

int bc_plan_f32(int isa, int group) {
    if (group <= 0) return isa;
    if (isa == BC_ISA_AVX512 && group % 16 == 0) return isa;
    if (isa == BC_ISA_AVX2 && group % 64 == 0) return isa;
    return BC_ISA_GENERIC;
}

/* ---------------------------------------------------------------- thread pool */

#ifdef _OPENMP
#include <omp.h>

/* fn(ctx, tid, nth) takes its work from a shared counter in ctx, so any team size works.
 * The team comes from torch's own OpenMP runtime (see setup.py), so torch ops and these
 * kernels never fight over the same cores with two sets of spinning threads. */
static void run_parallel(bc_task fn, void *ctx, int nth) {
    if (nth <= 1) {
        fn(ctx, 0, 1);
        return;
    }
#pragma omp parallel num_threads(nth)
    fn(ctx, omp_get_thread_num(), omp_get_num_threads());
}

#else /* no OpenMP: our own pool */

#define BC_MAX_THREADS 256
#define BC_SPIN 20000  /* pause loops a worker spins before it sleeps (~0.1 ms) */

/* NOTE: the machines this runs on are often shared, so a worker may wake late. Work is
 * handed out in chunks through an atomic counter inside each task, and the caller never
 * waits for a worker that has not joined: it closes the job, then waits only for the
 * workers already inside (active). A late worker sees the job closed and goes back to sleep. */
static struct {
    pthread_mutex_t call_mu;  /* one parallel call at a time */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int nworkers;
    pid_t pid;
    atomic_int gen;
    atomic_int open;
    atomic_int active;
    bc_task fn;
    void *ctx;
    int nth;
    pthread_t th[BC_MAX_THREADS];
} P = { .call_mu = PTHREAD_MUTEX_INITIALIZER, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER };

static inline void cpu_relax(void) {
#ifdef BC_X86
    __builtin_ia32_pause();
#endif
}

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg;  /* tid = id + 1; the caller is tid 0 */
    int seen = 0;
    for (;;) {
        int spins = 0;
        while (atomic_load(&P.gen) == seen && spins < BC_SPIN) {
            cpu_relax();
            spins++;
        }
        if (atomic_load(&P.gen) == seen) {
            pthread_mutex_lock(&P.mu);
            while (atomic_load(&P.gen) == seen) pthread_cond_wait(&P.cv, &P.mu);
            pthread_mutex_unlock(&P.mu);
        }
        seen = atomic_load(&P.gen);
        atomic_fetch_add(&P.active, 1);
        if (atomic_load(&P.open) && atomic_load(&P.gen) == seen && id + 1 < P.nth) P.fn(P.ctx, id + 1, P.nth);
        atomic_fetch_sub(&P.active, 1);
    }
    return NULL;
}

/* fn(ctx, tid, nth) must take its work from a shared counter in ctx (any tid may do any part). */
static void run_parallel(bc_task fn, void *ctx, int nth) {
    if (nth > BC_MAX_THREADS) nth = BC_MAX_THREADS;
    if (nth <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    pthread_mutex_lock(&P.call_mu);
    if (P.pid != getpid()) {  /* first use, or a forked child: the parent's workers are gone */
        P.nworkers = 0;
        P.pid = getpid();
        atomic_store(&P.active, 0);
    }
    while (P.nworkers < nth - 1) {
        if (pthread_create(&P.th[P.nworkers], NULL, worker, (void *)(intptr_t)P.nworkers) != 0) break;
        pthread_detach(P.th[P.nworkers]);
        P.nworkers++;
    }
    P.fn = fn;
    P.ctx = ctx;
    P.nth = nth;
    atomic_store(&P.open, 1);
    pthread_mutex_lock(&P.mu);
    atomic_fetch_add(&P.gen, 1);
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.mu);
    fn(ctx, 0, nth);
    atomic_store(&P.open, 0);
    int spins = 0;
    while (atomic_load(&P.active) > 0) {
        if (++spins < BC_SPIN) cpu_relax();
        else sched_yield();
    }
    pthread_mutex_unlock(&P.call_mu);
}

#endif /* _OPENMP */

void bc_run_parallel(bc_task fn, void *ctx, int nth) { run_parallel(fn, ctx, nth); }

/* ---------------------------------------------------------------- GEMM / prep entry points */

/* Work cut into [lo, hi) ranges handed out by an atomic counter: any team size works, and a
 * late or busy core simply takes fewer ranges. run() does one range of the kernel. */
typedef struct range_job range_job;
struct range_job {
    void (*run)(const range_job *j, int lo, int hi);
    const void *args;
    union {
        bc_gemm_fn gemm;
        bc_prep_fn prep;
        bc_dense_fn dense;
        bc_ew_fn ew;
    } kernel;
    int total, chunk;
    atomic_int next;
};

static void range_task(void *p, int tid, int nth) {
    range_job *j = p;
    (void)tid, (void)nth;
    for (;;) {
        int lo = atomic_fetch_add(&j->next, j->chunk);
        if (lo >= j->total) break;
        j->run(j, lo, lo + j->chunk < j->total ? lo + j->chunk : j->total);
    }
}

static void gemm_range(const range_job *j, int lo, int hi) { j->kernel.gemm(j->args, lo, hi); }
static void prep_range(const range_job *j, int lo, int hi) { j->kernel.prep(j->args, lo, hi); }
static void dense_range(const range_job *j, int lo, int hi) { j->kernel.dense(j->args, lo, hi); }
static void ew_range(const range_job *j, int lo, int hi) { j->kernel.ew(j->args, lo, hi); }

static void run_gemm(const bc_gemm_args *a, bc_gemm_fn fn, int nth) {
    /* a few items per thread balance a late or busy core; big M keeps items large because
     * each item streams the activations once */
    /* NOTE: one token (decode) is a memory-bound stream of the weights: one contiguous range per
     * thread keeps each core's hardware prefetch on one long stream. SmolLM2-135M decode at 2
     * threads (compiled, AOTInductor step): 8 ranges per thread 307-323 tok/s, 1 per thread
     * 360-372; a single layer of 1536 x 576, 2 threads: 12.7 -> 11.1 us per call. */
    int per_thread = a->M == 1 ? 1 : a->M > 64 ? 3 : 8;
    int chunk = (a->N + nth * per_thread - 1) / (nth * per_thread);
    range_job j = { gemm_range, a, { .gemm = fn }, a->N, nth > 1 ? (chunk + 3) / 4 * 4 : a->N, 0 };
    run_parallel(range_task, &j, nth);
}

/* NOTE: below this many products one thread does the work: waking the others costs more
 * than the layer. It was 4M while every eager layer ran ~40 us of Python in between (SmolLM-135M
 * decode layers, 0.1-0.9M products, took 2.15 ms/token on 2 threads and 1.45 ms on 1). With
 * whole-range chunks for one token (run_gemm) and the compiled decode step, 256k is measured
 * best: SmolLM2-135M at 2 threads, compiled 307-323 -> 360-372 tok/s (100k 357-362, 600k
 * 363-368, 0 350-368), eager packed decode 82 -> 88 tok/s. */
#define BC_PARALLEL_MIN_WORK ((int64_t)1 << 18)

static int pick_threads(int nthreads, int64_t work, int N) {
    if (nthreads < 1) nthreads = 1;
    if (work < BC_PARALLEL_MIN_WORK) return 1;
    int maxt = (N + 3) / 4;
    return nthreads < maxt ? nthreads : (maxt > 0 ? maxt : 1);
}

/* One CPUID.7.0:ECX feature bit, probed once and cached in *cache (-1: not probed yet). */
static int cpuid7_ecx_bit(atomic_int *cache, int bit) {
    int v = atomic_load(cache);
    if (v < 0) {
        v = 0;
#ifdef BC_X86
        unsigned a, b, c, d;
        if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) v = (c >> bit) & 1;
#endif
        atomic_store(cache, v);
    }
    return v;
}

/* GFNI (CPUID.7.0:ECX bit 8): a faster plane extraction inside the AVX-512 int8 kernel */
static int has_gfni(void) {
    static atomic_int cache = -1;
    return cpuid7_ecx_bit(&cache, 8);
}

/* AVX512_VBMI (CPUID.7.0:ECX bit 1): vpermi2b, the table lookup of the 1.6-bit kernel */
static int has_vbmi(void) {
    static atomic_int cache = -1;
    return cpuid7_ecx_bit(&cache, 1);
}

/* The ISA whose 1.6-bit int8 kernel runs (AVX-512 with VBMI, one scale column; else the
 * portable kernel, which needs no corr) and its flush unit: all chunks of the row. */
int bc_plan_t5_i8(int isa, int group, int Kp, int *unit_chunks) {
    int nch = Kp / BC_CHUNK_K;
    *unit_chunks = nch > 0 ? nch : 1;
    return isa == BC_ISA_AVX512 && group <= 0 && has_vbmi() ? BC_ISA_AVX512 : BC_ISA_GENERIC;
}

static bc_gemm_fn i8_kernel(int isa, int layout) {
    if (layout == BC_LAYOUT_T5) {
#ifdef BC_X86
        if (isa == BC_ISA_AVX512 && has_vbmi()) return bc_gemm_t5_i8_avx512_vbmi;
#endif
        return bc_gemm_t5_i8_generic;
    }
#ifdef BC_X86
    if (isa == BC_ISA_AVX512) {
        const char *off = getenv("BITCOMPILE_NO_GFNI");  /* tests force the plain AVX-512 build */
        return has_gfni() && !(off && *off && *off != '0') ? bc_gemm_i2_i8_avx512_gfni : bc_gemm_i2_i8_avx512;
    }
    if (isa == BC_ISA_AVX2) return bc_gemm_i2_i8_avx2;
#endif
    (void)isa;
    return bc_gemm_i2_i8_generic;
}

static bc_gemm_fn f32_kernel(int isa, int layout) {
    if (layout == BC_LAYOUT_T5) return bc_gemm_t5_f32_generic;  /* no SIMD weight-only 1.6-bit kernel yet */
#ifdef BC_X86
    if (isa == BC_ISA_AVX512) return bc_gemm_i2_f32_avx512;
    if (isa == BC_ISA_AVX2) return bc_gemm_i2_f32_avx2;
#endif
    (void)isa;
    return bc_gemm_i2_f32_generic;
}

/* isa must be the one bc_plan_i8 returned (corr was prepared for its flush unit). */
void bc_gemm_i8(const bc_gemm_args *a, int isa, int nthreads) {
    run_gemm(a, i8_kernel(isa, a->layout), pick_threads(nthreads, (int64_t)a->M * a->N * a->Kp, a->N));
}

/* Whether row m of the fp32 activations holds a NaN or an inf (max of |x| as bit patterns). */
static int f32_row_nonfinite(const bc_gemm_args *a, int m) {
    const uint32_t *x = (const uint32_t *)(a->xf + (int64_t)m * a->ldxf);
    uint32_t bits = 0;
    for (int k = 0; k < a->K; k++) {
        uint32_t b = x[k] & 0x7fffffffu;
        bits = b > bits ? b : bits;
    }
    return bits >= 0x7f800000u;
}

void bc_gemm_f32(const bc_gemm_args *a, int isa, int nthreads) {
    bc_gemm_fn fn = f32_kernel(isa, a->layout);
    run_gemm(a, fn, pick_threads(nthreads, (int64_t)a->M * a->N * a->Kp * 8, a->N));
#ifdef BC_X86
    if (fn != bc_gemm_i2_f32_avx512) return;
#else
    return;
#endif
    /* NOTE: the AVX-512 kernel adds x only where the weight is +-1, so a NaN or inf x facing
     * a zero weight is lost, where the reference's x * 0 gives NaN. Such rows (one cheap scan
     * of x per call) are computed again by the portable kernel, which multiplies every
     * weight: NaN / +-inf results do not depend on the order of the sum, so every ISA agrees. */
    for (int m = 0; m < a->M; m++) {
        if (!f32_row_nonfinite(a, m)) continue;
        bc_gemm_args row = *a;
        row.M = 1;
        row.xf = a->xf + (int64_t)m * a->ldxf;
        row.out = (char *)a->out + (int64_t)m * a->ldo * (a->out_bf16 ? 2 : 4);
        bc_gemm_i2_f32_generic(&row, 0, a->N);
    }
}

/* Row passes (activation prep, elementwise): M rows split over threads once the pass has
 * min_work elements (below that, waking the other threads costs more than the pass). */
static void run_rows(range_job *j, int M, int64_t work, int64_t min_work, int nthreads) {
    int nth = work < min_work || nthreads < 1 ? 1 : (nthreads < M ? nthreads : M);
    j->total = M;
    j->chunk = nth > 1 ? (M + 4 * nth - 1) / (4 * nth) : (M > 0 ? M : 1);
    run_parallel(range_task, j, nth);
}

void bc_prep_i8(const bc_prep_args *a, int isa, int nthreads) {
    bc_prep_fn fn = bc_prep_i8_generic;
#ifdef BC_X86
    if (isa == BC_ISA_AVX512) fn = bc_prep_i8_avx512;
    else if (isa == BC_ISA_AVX2) fn = bc_prep_i8_avx2;
#endif
    range_job j = { prep_range, a, { .prep = fn }, 0, 0, 0 };
    run_rows(&j, a->M, (int64_t)a->M * a->Kp, 1 << 17, nthreads);
}

/* ---------------------------------------------------------------- one call per layer */

/* NOTE: serving calls a layer per token; a malloc + two foreign calls per layer cost more
 * than a decode GEMV, so the int8 activations live in a per-thread buffer that is kept
 * while small (decode) and released after large calls (prefill, training). */
#define BC_SCRATCH_KEEP (1 << 20)

/* NOTE: a pthread key rather than __thread, so a thread's buffer is freed when it exits
 * (servers that recycle threads would otherwise leak up to BC_SCRATCH_KEEP each) */
typedef struct {
    void *p;
    size_t cap;
} scratch_slot;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *slot) {
    if (slot) {
        free(((scratch_slot *)slot)->p);
        free(slot);
    }
}

static void scratch_key_init(void) { pthread_key_create(&scratch_key, scratch_free); }

static scratch_slot *scratch_mine(void) {
    pthread_once(&scratch_once, scratch_key_init);
    scratch_slot *s = pthread_getspecific(scratch_key);
    if (!s) {
        s = calloc(1, sizeof *s);
        if (s && pthread_setspecific(scratch_key, s) != 0) {
            free(s);
            s = NULL;
        }
    }
    return s;
}

static void *scratch_get(scratch_slot *s, size_t n) {
    if (n <= s->cap) return s->p;
    free(s->p);
    s->p = NULL;
    s->cap = 0;
    if (posix_memalign(&s->p, 64, n) != 0) return s->p = NULL;
    s->cap = n;
    return s->p;
}

static void scratch_trim(scratch_slot *s) {
    if (s->cap > BC_SCRATCH_KEEP) {
        free(s->p);
        s->p = NULL;
        s->cap = 0;
    }
}

/* Quantize float x (x_kind 0 fp32 / 1 bf16, row stride ldx) per token and run the int8
 * GEMM with base's weights, scales, bias and plan (unit_chunks, n_units: n_units == 0
 * means the kernel takes no corr); writes M x N into out (row stride base->ldo).
 * isa must be the one bc_plan_i8 returned. Returns 0, or -1 when memory ran out. */
int bc_linear_i8(const bc_gemm_args *base, const void *x, int64_t ldx, int x_kind, int M, void *out, int isa,
                 int nthreads) {
    size_t xq_bytes = ((size_t)M * base->Kp + 63) & ~(size_t)63;
    size_t sx_bytes = ((size_t)M * sizeof(float) + 63) & ~(size_t)63;
    size_t corr_bytes = (size_t)M * base->n_units * 16 * sizeof(int32_t);
    scratch_slot *slot = scratch_mine();
    char *buf = slot ? scratch_get(slot, xq_bytes + sx_bytes + corr_bytes + 64) : NULL;
    if (!buf) return -1;
    bc_prep_args p = { M, base->K, base->Kp, x, ldx, x_kind, (int8_t *)buf, (float *)(buf + xq_bytes),
                       base->n_units ? (int32_t *)(buf + xq_bytes + sx_bytes) : NULL, base->unit_chunks, base->n_units, NULL };
    bc_prep_i8(&p, isa, nthreads);
    bc_gemm_args a = *base;
    a.M = M;
    a.xq = p.xq;
    a.sx = p.sx;
    a.corr = p.corr;
    a.out = out;
    bc_gemm_i8(&a, isa, nthreads);
    scratch_trim(slot);
    return 0;
}

/* ---------------------------------------------------------------- training elementwise passes */

void bc_ew(const bc_ew_args *a, int isa, int nthreads) {
    bc_ew_fn fn = bc_ew_generic;
#ifdef BC_X86
    if (isa == BC_ISA_AVX512) fn = bc_ew_avx512;
    else if (isa == BC_ISA_AVX2) fn = bc_ew_avx2;
#endif
    range_job j = { ew_range, a, { .ew = fn }, 0, 0, 0 };
    run_rows(&j, a->M, (int64_t)a->M * a->N, 1 << 18, nthreads);
}

/* ---------------------------------------------------------------- dense fp32 GEMV */

static void run_dense(const bc_dense_args *a, bc_dense_fn fn, int64_t work, int nthreads) {
    int nth = pick_threads(nthreads, work, a->N);
    int chunk = (a->N + nth * 8 - 1) / (nth * 8);
    chunk = nth > 1 ? (chunk + 3) / 4 * 4 : a->N;
    range_job j = { dense_range, a, { .dense = fn }, a->N, chunk < 4 ? 4 : chunk, 0 };
    run_parallel(range_task, &j, nth);
}

void bc_dense_f32(const bc_dense_args *a, int isa, int nthreads) {
    bc_dense_fn fn = bc_dense_f32_generic;
#ifdef BC_X86
    if (isa == BC_ISA_AVX512) fn = bc_dense_f32_avx512;
    else if (isa == BC_ISA_AVX2) fn = bc_dense_f32_avx2;
#endif
    run_dense(a, fn, (int64_t)a->M * a->N * a->K * 4, nthreads);
}

/* The ISA whose W8A8 dense kernel runs (AVX2 has no unsigned x signed byte dot without
 * 16-bit saturation, so it runs the portable kernel). */
int bc_plan_dense_i8(int isa) { return isa == BC_ISA_AVX512 ? isa : BC_ISA_GENERIC; }

/* W8A8 dense: a->xq prepared by bc_prep_i8 (row stride Kp). */
void bc_dense_i8(const bc_dense_args *a, int isa, int nthreads) {
    bc_dense_fn fn = bc_dense_i8_generic;
#ifdef BC_X86
    if (isa == BC_ISA_AVX512) fn = bc_dense_i8_avx512;
#endif
    if (fn == bc_dense_i8_generic) {
        run_dense(a, fn, (int64_t)a->M * a->N * a->K, nthreads);
        return;
    }
    /* the activation sums of the kernel's w + 128 correction, once per call */
    int32_t one_row, *xsum = a->M == 1 ? &one_row : malloc(sizeof(int32_t) * (size_t)a->M);
    if (!xsum) abort();
    for (int m = 0; m < a->M; m++) {
        const int8_t *x = a->xq + (int64_t)m * a->Kp;
        int32_t s = 0;
        for (int k = 0; k < a->K; k++) s += x[k];
        xsum[m] = s;
    }
    bc_dense_args b = *a;
    b.xsum = xsum;
    run_dense(&b, fn, (int64_t)a->M * a->N * a->K, nthreads);
    if (xsum != &one_row) free(xsum);
}

typedef struct {
    const int8_t *q;
    int64_t ldq;
    int N, K;
    uint8_t *out;
} pack_args;

static void pack_range(const range_job *j, int lo, int hi) {
    const pack_args *a = j->args;
    bc_pack_i2_generic(a->q, a->ldq, a->N, a->K, a->out, lo, hi);
}

/* Pack q (N x K int8 in {-1,0,1}, row stride ldq) into out (N x Kp/4). Returns -1 on an invalid code. */
int bc_pack_i2(const int8_t *q, int64_t ldq, int N, int K, uint8_t *out, int nthreads) {
    for (int n = 0; n < N; n++) {
        const int8_t *row = q + (int64_t)n * ldq;
        int bad = 0;
        for (int k = 0; k < K; k++) bad |= (row[k] < -1) | (row[k] > 1);
        if (bad) return -1;
    }
    int nth = (int64_t)N * K < (1 << 20) || nthreads < 1 ? 1 : nthreads;
    pack_args args = { q, ldq, N, K, out };
    range_job j = { pack_range, &args, { 0 }, N, (N + 4 * nth - 1) / (4 * nth), 0 };
    run_parallel(range_task, &j, nth);
    return 0;
}
