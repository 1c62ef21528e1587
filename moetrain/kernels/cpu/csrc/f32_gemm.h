// fp32 GEMM and transpose for one expert's blocks, AVX-512 (f32_gemm.cpp).
//
// Why not MKL: measured on the 2-core AMD EPYC (Zen 4) development machine with one expert's shapes
// (d_model 256, d_ff 512). Single-threaded, warm: MKL (at::mm) 93-103 GFLOP/s, this 105-113; with 27 columns
// (an expert's rows as the columns of an input-gradient product) MKL 42, this 88. In the expert kernel, 64
// experts of 64 rows, 2 threads, each expert's weights cold as in a step: forward 22.2 -> 18.7 ms, backward
// 46.3 -> 33.3 ms; 8 experts of 512 rows: 17.9 -> 16.7 and 35.6 -> 35.1 ms (docs/benchmarks.md). What makes
// the difference: B is read in place (no packing pass that stalls on memory before any arithmetic), the
// next panel of the streamed operand is prefetched while the current one is computed, narrow edges of 17-48
// columns keep 24 accumulators busy (1-16 columns take 8 rows, so that their broadcasts stay in L1), and outputs
// nothing reads soon (weight gradients) are written with streaming stores.
#pragma once

#include <cstdint>

namespace f32_gemm {

enum class Store {
  kWrite,   // C = A B
  kAdd,     // C += A B
  kStream,  // C = A B with non-temporal stores (C is not read again soon: weight gradients)
};

// Whether this CPU runs the kernel (AVX-512F and VL); callers use ATen's GEMMs otherwise.
bool available();

// C[i, j] (=, +=) sum_k A(i, k) B(k, j) for i < M, j < N, k < K, with A(i, k) = a[i * a_si + k * a_sk] (any
// strides: A is read by scalar broadcasts, so transposed operands cost nothing), B(k, j) = b[k * ldb + j]
// and C(i, j) = c[i * ldc + j] (rows contiguous). Each C tile is summed over k in order by one thread, so the
// result does not depend on the number of threads; inside an at::parallel_for region it runs inline.
// then[0, then_floats): memory the caller reads next (the next GEMM's weight), prefetched during this GEMM when B
// streams (M <= N), in shares over its tiles, after each tile's own lines and within its K steps (a share that does
// not fit is cut short: small experts of a few row-tiles, or a short last pass of a long K, prefetch less of it).
// In an expert's forward at 64 experts of 64 rows (2 threads, weights cold in memory) that took the forward from
// 22.8 to 20.6 ms; the weights are 96 MiB, read at ~30 GB/s here.
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b, int64_t ldb,
          float* c, int64_t ldc, Store store, const float* then = nullptr, int64_t then_floats = 0);

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < rows, j < cols.
void transpose(const float* src, int64_t rows, int64_t cols, int64_t ld_src, float* dst, int64_t ld_dst);

}  // namespace f32_gemm
