/* Our own CPU kernel for the expert-kernel comparison (benchmarks/expert_kernels.py):
 * y = W x for W in GGUF's Q4_0 blocks, read in place, x float32, batch 1.
 *
 * Same scheme as llama.cpp's CPU path, written from the block format: x is quantized to
 * 8-bit blocks of 32 (one float scale each), each Q4_0 block (an f16 scale and 32 4-bit
 * values, v = (q - 8) * d; byte j holds element j in its low nibble and element j + 16 in
 * its high nibble) is unpacked to signed bytes and multiplied with x's bytes by AVX2 integer
 * dot products; one float multiply-add per block. Rows are split over OpenMP threads.
 *
 * gcc -O3 -march=native -fopenmp -shared -fPIC q4_0_matvec.c -o libq4_0_matvec.so
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    uint16_t d;      /* f16 scale */
    uint8_t qs[16];  /* 32 4-bit values */
} block_q4_0;        /* 18 bytes, as in the file */

typedef struct {
    float d;
    int8_t qs[32];
} block_x8;          /* the activation, quantized per 32 */

static void quantize_x(const float *x, block_x8 *out, int n_blocks) {
    for (int b = 0; b < n_blocks; b++) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[b * 32 + j]));
        float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
        out[b].d = d;
        for (int j = 0; j < 32; j++) out[b].qs[j] = (int8_t)lrintf(x[b * 32 + j] * inv);
    }
}

static inline float row_dot(const block_q4_0 *row, const block_x8 *xq, int n_blocks) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8), ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < n_blocks; b++) {
        __m128i packed = _mm_loadu_si128((const __m128i *)row[b].qs);
        __m256i q = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);  /* [hi | lo] nibbles */
        q = _mm256_sub_epi8(_mm256_and_si256(q, low4), eight);             /* -8..7 */
        __m256i xv = _mm256_loadu_si256((const __m256i *)xq[b].qs);
        /* signed x signed bytes: |q| * (x with q's sign), then pairwise sums to int32 */
        __m256i prod16 = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xv, q));
        __m256i prod32 = _mm256_madd_epi16(prod16, ones);
        __m256 scale = _mm256_set1_ps(_cvtsh_ss(row[b].d) * xq[b].d);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(prod32), scale, acc);
    }
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

/* w: rows x (cols / 32) Q4_0 blocks; x: cols floats; y: rows floats. cols % 32 == 0. */
int q4_0_matvec(const void *w, const float *x, float *y, int rows, int cols, int threads) {
    int n_blocks = cols / 32;
    block_x8 *xq = malloc(sizeof(block_x8) * (size_t)n_blocks);
    if (!xq) return -1;
    quantize_x(x, xq, n_blocks);
    const block_q4_0 *blocks = (const block_q4_0 *)w;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < rows; r++) y[r] = row_dot(blocks + (size_t)r * n_blocks, xq, n_blocks);
    free(xq);
    return 0;
}
