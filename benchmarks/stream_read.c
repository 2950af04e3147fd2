/* Independent STREAM-style bandwidth check for `moechat profile` (benchmarks/ram_bandwidth.py).
 * STREAM rules: arrays >= 4x the last-level cache, every thread on its own chunk, best of N.
 * n must be a multiple of 8. Kernels: read (sum of doubles; bytes = 8/element), copy (16 B/element), triad (24 B/element). */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

static double now(void) { return omp_get_wtime(); }

int main(int argc, char **argv) {
    size_t n = argc > 1 ? strtoull(argv[1], 0, 10) : 64u << 20;  /* elements per array */
    int reps = argc > 2 ? atoi(argv[2]) : 10;
    int read_only = argc > 3;  /* any third argument: only the read kernel (more samples per second) */
    double *a = aligned_alloc(64, n * 8), *b = aligned_alloc(64, n * 8), *c = aligned_alloc(64, n * 8);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) { a[i] = 1.0; b[i] = 2.0; c[i] = 0.0; }
    double best_read = 1e30, best_copy = 1e30, best_triad = 1e30, sink = 0;
    for (int r = 0; r < reps; r++) {
        /* eight independent partial sums: one accumulator chain would be bound by the add
           latency (~16 B/cycle), not by memory */
        double t = now(), s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static)
        for (size_t i = 0; i < n; i += 8) {
            s += (a[i] + a[i + 1]) + (a[i + 2] + a[i + 3]) + ((a[i + 4] + a[i + 5]) + (a[i + 6] + a[i + 7]));
        }
        t = now() - t; sink += s; if (t < best_read) best_read = t;
        if (read_only) continue;
        t = now();
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) c[i] = a[i];
        t = now() - t; if (t < best_copy) best_copy = t;
        t = now();
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) a[i] = b[i] + 3.0 * c[i];
        t = now() - t; if (t < best_triad) best_triad = t;
    }
    printf("threads %d\nread_gbs %.2f\n", omp_get_max_threads(), n * 8.0 / best_read / 1e9);
    if (!read_only) printf("copy_gbs %.2f\ntriad_gbs %.2f\n", n * 16.0 / best_copy / 1e9, n * 24.0 / best_triad / 1e9);
    printf("sink %g\n", sink);
    return 0;
}
