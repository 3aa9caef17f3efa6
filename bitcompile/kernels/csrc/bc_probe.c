/* Memory read-bandwidth probe: the benchmarks' ceiling for a memory-bound GEMV
 * (benchmarks/bench_kernels.py). Not a kernel; it shares only the thread pool. */
#include <stdatomic.h>

#include "bc_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#define BC_X86 1
#endif

typedef struct {
    const uint64_t *p;
    size_t n_words, chunk;
    atomic_size_t next;
    atomic_uint_fast64_t sink;
} read_job;

#ifdef BC_X86
#define BC_READ_TARGET __attribute__((target("avx2")))
#else
#define BC_READ_TARGET
#endif

__attribute__((always_inline)) inline static void read_body(void *p) {
    read_job *j = p;
    uint64_t acc[8] = { 0 };
    for (;;) {
        size_t w0 = atomic_fetch_add(&j->next, j->chunk);
        if (w0 >= j->n_words) break;
        size_t w1 = w0 + j->chunk < j->n_words ? w0 + j->chunk : j->n_words;
        for (size_t w = w0; w + 8 <= w1; w += 8)
            for (int i = 0; i < 8; i++) acc[i] ^= j->p[w + i];  /* 8 independent streams of loads */
    }
    atomic_fetch_xor(&j->sink, acc[0] ^ acc[1] ^ acc[2] ^ acc[3] ^ acc[4] ^ acc[5] ^ acc[6] ^ acc[7]);
}

static void read_task(void *p, int tid, int nth) {
    (void)tid, (void)nth;
    read_body(p);
}

/* the same loop compiled for 32-byte loads; chosen when the CPU has AVX2 */
BC_READ_TARGET static void read_task_wide(void *p, int tid, int nth) {
    (void)tid, (void)nth;
    read_body(p);
}

/* Read n bytes (a multiple of 64) with nthreads threads; the benchmarks' memory-bandwidth ceiling. */
uint64_t bc_read_bytes(const void *p, size_t n, int nthreads) {
    read_job j = { p, n / 8, (size_t)1 << 17, 0, 0 };
    bc_run_parallel(bc_isa_supported(BC_ISA_AVX2) ? read_task_wide : read_task, &j, nthreads < 1 ? 1 : nthreads);
    return atomic_load(&j.sink);
}
