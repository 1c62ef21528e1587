// fp32 GEMM and transpose for one expert's blocks, AVX-512; see f32_gemm.h for why and what.
//
// Register tiles hold 24 zmm accumulators: 6 rows x 64 columns (4 zmm) in full column blocks, and at a narrow
// right edge 8 x 48 or 12 x 32, so that every k step still does 24 FMAs for one broadcast of A per row and one load
// of B per vector; a right edge of 1-16 columns is 8 x 16, 8 accumulators (why at rows_for). The last zmm is
// masked, or a ymm when it has 8 columns or fewer. Rows at the bottom edge use a smaller row count (the MR
// template). Nothing is packed: B's rows are read in place and A by broadcasts.
//
// Task order: when A is the larger operand (it streams: a weight in the input-gradient products) a task is a
// band of 24 rows across all column blocks, whose tiles prefetch the next band of A between them; otherwise
// (B streams: a weight in the forward products, or neither) a task is one tile, column block by block, and
// the row-tiles of a block prefetch the next block of B between them. One prefetch per k step rides along
// with the FMAs. When B streams, the caller can also name the weight its next GEMM reads (`then`): the tiles
// prefetch it in shares after their own lines, so that a chain of GEMMs over weights cold in memory (an expert's
// forward: w1, w3, w2, then the next expert's w1) finds each weight in L2.
#include "f32_gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <utility>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

namespace f32_gemm {
namespace {

constexpr int64_t kMR = 6, kNR = 64, kLine = 64;  // rows and columns of a register tile; cache line bytes
constexpr int64_t kKC = 512;     // k steps per pass: a 64-column panel of B is then at most 128 KiB (L2)
constexpr int64_t kChunk = 192;  // rows per chunk when B streams (a multiple of every tile's row count)

// Cache lines to prefetch while a tile's k loop runs, one per k step: base + k * stride for k < count. (A
// constant stride keeps the bookkeeping to one pointer: the loop needs every register it has.)
struct Prefetch {
  const char* base = nullptr;
  int64_t stride = 0, count = 0;
  const char* then = nullptr;  // after those, then_count consecutive lines from here (the next GEMM's weight)
  int64_t then_count = 0;
};

// The k steps [k0, k1) of a tile into acc; with PREFETCH one line of pf per step (a separate instantiation, so
// that no branch splits the loop body: the compiler then keeps all 24 accumulators in registers). HALF: the last
// column vector is 8 lanes wide (a ymm, in acc_h), for a right edge of 1-8 columns past a multiple of 16.
template <int MR, int NQ, bool HALF, bool PREFETCH>
__attribute__((target("avx512f,avx512vl,fma"), always_inline)) inline void tile_steps(
    __m512 (&acc)[MR][NQ], __m256 (&acc_h)[MR], int64_t k0, int64_t k1, const float* a, int64_t a_si, int64_t a_sk,
    const float* b, int64_t ldb, __mmask16 last_mask, const Prefetch& pf) {
  constexpr int NZ = HALF ? NQ - 1 : NQ;  // 16-lane (zmm) column vectors
  for (int64_t k = k0; k < k1; ++k) {
    const float* b_k = b + k * ldb;
    __m512 bv[NQ];
#pragma GCC unroll 4
    for (int q = 0; q < NZ; ++q)
      bv[q] = !HALF && q == NQ - 1 ? _mm512_maskz_loadu_ps(last_mask, b_k + 16 * q) : _mm512_loadu_ps(b_k + 16 * q);
    __m256 bh;
    if constexpr (HALF) bh = _mm256_maskz_loadu_ps(__mmask8(last_mask), b_k + 16 * NZ);
    if constexpr (PREFETCH) _mm_prefetch(pf.base + k * pf.stride, _MM_HINT_T0);
    const float* a_k = a + k * a_sk;
#pragma GCC unroll 24
    for (int r = 0; r < MR; ++r) {
      if constexpr (NZ == 0) {  // a ymm broadcast: a zmm one would take both 256-bit load slots (Zen 4)
        acc_h[r] = _mm256_fmadd_ps(_mm256_set1_ps(a_k[r * a_si]), bh, acc_h[r]);
        continue;
      }
      const __m512 av = _mm512_set1_ps(a_k[r * a_si]);
#pragma GCC unroll 4
      for (int q = 0; q < NZ; ++q) acc[r][q] = _mm512_fmadd_ps(av, bv[q], acc[r][q]);
      if constexpr (HALF) acc_h[r] = _mm256_fmadd_ps(_mm512_castps512_ps256(av), bh, acc_h[r]);
    }
  }
}

// One register tile: MR rows x NQ column vectors of C, summed over its K steps in order (the steps that prefetch
// this GEMM's next lines, then those that prefetch the next GEMM's, then the rest).
template <int MR, int NQ, bool HALF>
__attribute__((target("avx512f,avx512vl,fma"))) void tile_kernel(int64_t K, const float* a, int64_t a_si, int64_t a_sk,
                                                             const float* b, int64_t ldb, float* c, int64_t ldc,
                                                             __mmask16 last_mask, Store store, bool stream,
                                                             Prefetch pf) {
  constexpr int NZ = HALF ? NQ - 1 : NQ;
  __m512 acc[MR][NQ];
  __m256 acc_h[MR];
#pragma GCC unroll 24
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int q = 0; q < NZ; ++q) acc[r][q] = _mm512_setzero_ps();
    if constexpr (HALF) acc_h[r] = _mm256_setzero_ps();
  }
  const int64_t pf_end = std::min(pf.count, K), then_end = std::min(pf_end + pf.then_count, K);
  tile_steps<MR, NQ, HALF, true>(acc, acc_h, 0, pf_end, a, a_si, a_sk, b, ldb, last_mask, pf);
  // line k - pf_end of `then` at step k (no pointer formed when there is none)
  const Prefetch then{pf.then ? pf.then - pf_end * kLine : nullptr, kLine, then_end - pf_end};
  tile_steps<MR, NQ, HALF, true>(acc, acc_h, pf_end, then_end, a, a_si, a_sk, b, ldb, last_mask, then);
  tile_steps<MR, NQ, HALF, false>(acc, acc_h, then_end, K, a, a_si, a_sk, b, ldb, last_mask, pf);
  const bool full = HALF || last_mask == 0xFFFF;  // whether the last zmm column is whole
  const bool add = store == Store::kAdd;
#pragma GCC unroll 24
  for (int r = 0; r < MR; ++r) {
    float* c_r = c + r * ldc;
#pragma GCC unroll 4
    for (int q = 0; q < NZ; ++q) {
      const __mmask16 m = !HALF && q == NQ - 1 ? last_mask : __mmask16(0xFFFF);
      __m512 v = acc[r][q];
      if (add) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, c_r + 16 * q));
      if (stream && (q < NQ - 1 || full))
        _mm512_stream_ps(c_r + 16 * q, v);
      else
        _mm512_mask_storeu_ps(c_r + 16 * q, m, v);
    }
    if constexpr (HALF) {
      const __mmask8 m = __mmask8(last_mask);
      __m256 v = acc_h[r];
      if (add) v = _mm256_add_ps(v, _mm256_maskz_loadu_ps(m, c_r + 16 * NZ));
      _mm256_mask_storeu_ps(c_r + 16 * NZ, m, v);
    }
  }
}

using TileFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, __mmask16,
                        Store, bool, Prefetch);

// Rows of a tile with nq zmm columns: 24 accumulators, so that a narrow column block at the right edge (an expert
// with 70 rows is a 64 + 6 column GEMM in the input-gradient products) still does 24 FMAs per k step: 6 x 4, 8 x 3
// or 12 x 2. A block of one vector (1-16 columns) takes 8 rows, not 24: its broadcasts read 24 rows of A per k step
// otherwise, and when A is a weight with 512 columns those rows lie 2 KiB apart, in 2 of L1's 64 sets (16 lines),
// so the tile would evict its own lines before their next 15 k steps. Measured single-threaded on the 2-core
// machine, (256 x 512) times (512 x n), n = 65-80: 238-253 -> 203-220 us (24 -> 8 rows; 12 rows: 206-225); the
// router's logits GEMM at 8 experts (4096 x 256 times 256 x 8, 2 threads): 0.149 -> 0.132 ms.
constexpr int64_t rows_for(int64_t nq) { return nq == 1 ? 8 : 24 / nq; }
constexpr int64_t kBand = 24;  // rows per task when A streams: a multiple of every rows_for

template <int NQ, bool HALF, int... R>
constexpr std::array<TileFn, sizeof...(R)> kernels_of_width(std::integer_sequence<int, R...>) {
  return {tile_kernel<R + 1, NQ, HALF>...};
}

// The tile of `rows` rows and nq column vectors; half: the last vector is 8 lanes wide.
TileFn pick(int64_t rows, int64_t nq, bool half) {
  static constexpr auto w1 = kernels_of_width<1, false>(std::make_integer_sequence<int, rows_for(1)>{});
  static constexpr auto w2 = kernels_of_width<2, false>(std::make_integer_sequence<int, rows_for(2)>{});
  static constexpr auto w3 = kernels_of_width<3, false>(std::make_integer_sequence<int, rows_for(3)>{});
  static constexpr auto w4 = kernels_of_width<4, false>(std::make_integer_sequence<int, rows_for(4)>{});
  static constexpr auto h1 = kernels_of_width<1, true>(std::make_integer_sequence<int, rows_for(1)>{});
  static constexpr auto h2 = kernels_of_width<2, true>(std::make_integer_sequence<int, rows_for(2)>{});
  static constexpr auto h3 = kernels_of_width<3, true>(std::make_integer_sequence<int, rows_for(3)>{});
  static constexpr auto h4 = kernels_of_width<4, true>(std::make_integer_sequence<int, rows_for(4)>{});
  switch (nq) {
    case 1: return (half ? h1 : w1)[rows - 1];
    case 2: return (half ? h2 : w2)[rows - 1];
    case 3: return (half ? h3 : w3)[rows - 1];
    default: return (half ? h4 : w4)[rows - 1];
  }
}

struct Problem {
  int64_t M, N, K;
  const float* a;
  int64_t a_si, a_sk;
  const float* b;
  int64_t ldb;
  float* c;
  int64_t ldc;
  Store store;
  bool stream;
  const char* then_base = nullptr;  // lines the tiles prefetch after their own (B streaming only; see gemm)
  int64_t then_lines = 0;

  int64_t blocks() const { return (N + kNR - 1) / kNR; }
  int64_t cols(int64_t j) const { return std::min(kNR, N - j * kNR); }
  static int64_t zmm_of(int64_t cols) { return (cols + 15) / 16; }
  int64_t tile_rows(int64_t j) const { return rows_for(zmm_of(cols(j))); }
  int64_t row_tiles(int64_t j) const { return (M + tile_rows(j) - 1) / tile_rows(j); }

  // C[i0 : i0 + rows, column block j] with the given prefetch
  void tile(int64_t i0, int64_t rows, int64_t j, const Prefetch& pf) const {
    // a last vector of 1-8 columns is a ymm: Zen 4 runs a zmm FMA as two 256-bit halves, so it costs half of a
    // masked zmm. Measured single-threaded on the 2-core machine, (512 x 256) times (256 x n), an expert's rows as
    // the n columns: n = 49 154 -> 134 us, n = 56 153 -> 131 us (3 zmm + 1 ymm). A block of 1-8 columns alone
    // (n = 65, 72) stayed where it was (191 -> 187 us): with 24 rows its broadcasts bound it either way.
    const int64_t n = cols(j), nq = zmm_of(n), tail = n - 16 * (nq - 1);
    const bool half = tail <= 8;
    const auto last_mask = __mmask16(tail == 16 ? 0xFFFF : (1u << tail) - 1);
    pick(rows, nq, half)(K, a + i0 * a_si, a_si, a_sk, b + j * kNR, ldb, c + i0 * ldc + j * kNR, ldc, last_mask, store,
                         stream, pf);
  }
};

// A streams (it is the larger operand: a weight in the input-gradient products): task = a band of kBand rows,
// across all column blocks; the band's tiles prefetch the next band of A between them, K lines each, where
// A's rows run along k (one block of memory).
void run_band(const Problem& p, int64_t band) {
  const int64_t i0 = band * kBand, rows = std::min(kBand, p.M - i0);
  const int64_t next = i0 + kBand, next_rows = std::min(kBand, p.M - next);
  const char* pf_base = p.a_sk == 1 && next_rows > 0 ? reinterpret_cast<const char*>(p.a + next * p.a_si) : nullptr;
  const int64_t pf_lines = pf_base ? ((next_rows - 1) * p.a_si + p.K) * int64_t(sizeof(float)) / kLine + 1 : 0;
  int64_t done = 0;  // lines of the next band prefetched so far
  for (int64_t j = 0; j < p.blocks(); ++j) {
    const int64_t h = p.tile_rows(j);
    for (int64_t r = 0; r < rows; r += h) {
      Prefetch pf;
      if (done < pf_lines) {
        pf = {pf_base + done * kLine, kLine, std::min(p.K, pf_lines - done)};
        done += pf.count;
      }
      p.tile(i0 + r, std::min(h, rows - r), j, pf);
    }
  }
}

// B streams (a weight in the forward products, or neither operand dominates): task = tile (i, j) in column-block
// order; the row-tiles of block j share the prefetch of block j + 1 (K rows of up to 4 lines): row-tile i takes
// line column i % 4 of a range of rows, so that every column is fetched whatever the number of row-tiles. `then` is
// the tile's share of the lines the caller's next GEMM reads.
void run_tile(const Problem& p, int64_t j, int64_t i, const Prefetch& then) {
  const int64_t h = p.tile_rows(j), tiles = p.row_tiles(j);
  Prefetch pf;
  pf.then = then.base;
  pf.then_count = then.count;
  if (j + 1 < p.blocks()) {
    const int64_t f = sizeof(float), line_cols = (p.cols(j + 1) * f + kLine - 1) / kLine;
    // row-tile i takes line column i % line_cols; the row-tiles of one column split its K rows between them
    const int64_t column = i % line_cols, of_column = (tiles - column + line_cols - 1) / line_cols;
    const int64_t r0 = (i / line_cols) * p.K / of_column, r1 = (i / line_cols + 1) * p.K / of_column;
    pf.base = reinterpret_cast<const char*>(p.b + (j + 1) * kNR + r0 * p.ldb) + (i % line_cols) * kLine;
    pf.stride = p.ldb * f;
    pf.count = r1 - r0;
  }
  p.tile(i * h, std::min(h, p.M - i * h), j, pf);
}

__attribute__((target("avx512f"))) inline void transpose16(const float* src, int64_t ld_src, float* dst,
                                                           int64_t ld_dst) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xDD);
    }
  for (int i = 0; i < 8; ++i) {
    _mm512_storeu_ps(dst + i * ld_dst, _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88));
    _mm512_storeu_ps(dst + (i + 8) * ld_dst, _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD));
  }
}

// Rows [r0, r1) of src (r0 a multiple of 16) into their columns of dst.
__attribute__((target("avx512f"))) void transpose_rows(const float* src, int64_t r0, int64_t r1, int64_t cols,
                                                       int64_t ld_src, float* dst, int64_t ld_dst) {
  const int64_t rows16 = r0 + (r1 - r0) / 16 * 16, cols16 = cols / 16 * 16;
  for (int64_t i = r0; i < rows16; i += 16)
    for (int64_t j = 0; j < cols16; j += 16) transpose16(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
  for (int64_t i = r0; i < r1; ++i)  // the edges
    for (int64_t j = i < rows16 ? cols16 : 0; j < cols; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
}

}  // namespace

bool available() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("fma");
  return yes;
}

namespace {

// One pass over p.K (at most kKC): bands when A streams; else chunks of kChunk rows, each tiled block by block.
void run_pass(const Problem& p) {
  const auto finish = [&] {
    if (p.stream) _mm_sfence();  // streaming stores are weakly ordered: publish them before other threads read C
  };
  // tasks of ~4 MFLOP or more, so that small GEMMs outside a parallel region stay on one thread
  const int64_t flops_per_row = 2 * p.N * std::max<int64_t>(p.K, 1);
  if (p.M > p.N) {
    const int64_t bands = (p.M + kBand - 1) / kBand;
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 22) / (kBand * flops_per_row));
    at::parallel_for(0, bands, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t band = b0; band < b1; ++band) run_band(p, band);
      finish();
    });
    return;
  }
  for (int64_t m0 = 0; m0 < p.M; m0 += kChunk) {
    Problem q = p;  // rows [m0, m0 + kChunk): their A rows stay in cache across the column blocks
    q.M = std::min(kChunk, p.M - m0);
    q.a += m0 * p.a_si;
    q.c += m0 * p.ldc;
    // tiles numbered block by block; only the last block can have other tile rows than the first
    const int64_t full_blocks = q.blocks() - 1, per_block = q.row_tiles(0);
    const int64_t tiles = full_blocks * per_block + q.row_tiles(full_blocks);
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 22) / (kMR * flops_per_row));
    // this chunk's share of the next GEMM's lines, split again among its tiles
    const int64_t chunks = (p.M + kChunk - 1) / kChunk, c = m0 / kChunk;
    const int64_t l0 = c * p.then_lines / chunks, l1 = (c + 1) * p.then_lines / chunks;
    at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t j = std::min(t / per_block, full_blocks);
        Prefetch then;
        if (l1 > l0) {
          const int64_t a0 = l0 + t * (l1 - l0) / tiles, a1 = l0 + (t + 1) * (l1 - l0) / tiles;
          then = {q.then_base + a0 * kLine, kLine, a1 - a0};
        }
        run_tile(q, j, t - j * per_block, then);
      }
      finish();
    });
  }
}

}  // namespace

void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b, int64_t ldb,
          float* c, int64_t ldc, Store store, const float* then, int64_t then_floats) {
  if (M <= 0 || N <= 0) return;
  const bool can_stream = store == Store::kStream && reinterpret_cast<uintptr_t>(c) % kLine == 0 && ldc % 16 == 0;
  // K in passes of at most kKC, so that a tile's panel of B (kKC x 64) stays in L2 however long K is (the weight
  // gradients of an expert with thousands of rows); later passes add to C, the last one may stream it out. A K
  // longer than kKC goes in passes of kKC / 2. Measured on the 2-core machine: single-threaded (an expert's GEMMs in
  // the kernel's parallel region), an expert's weight gradients over 1024 rows ran at 86 -> 100 (256 x 512) and
  // 76 -> 89 GFLOP/s (512 x 256), and the layer at 8 experts top-2 2.7 % faster; with K up to kKC nothing changes.
  // The passes depend on K alone, so the bits do not depend on the number of threads.
  const int64_t pass = K > kKC ? kKC / 2 : kKC;
  for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += pass) {
    const int64_t kc = std::min(pass, K - k0);
    const bool add = store == Store::kAdd || k0 > 0;
    const bool last = k0 + pass >= K;  // the next GEMM's lines go with the last pass
    run_pass(Problem{M, N, kc, a + k0 * a_sk, a_si, a_sk, b + k0 * ldb, ldb, c, ldc, add ? Store::kAdd : Store::kWrite,
                     can_stream && last, last ? reinterpret_cast<const char*>(then) : nullptr,
                     last && then ? (then_floats * int64_t(sizeof(float)) + kLine - 1) / kLine : 0});
  }
}

void transpose(const float* src, int64_t rows, int64_t cols, int64_t ld_src, float* dst, int64_t ld_dst) {
  // 16-row blocks over the threads when called outside a parallel region (one large expert), inline inside
  const int64_t blocks = (rows + 15) / 16;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (16 * std::max<int64_t>(cols, 1)));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    transpose_rows(src, b0 * 16, std::min(rows, b1 * 16), cols, ld_src, dst, ld_dst);
  });
}

}  // namespace f32_gemm

#else  // not x86-64: available() is false and the kernel's callers use ATen's GEMMs

namespace f32_gemm {
bool available() { return false; }
void gemm(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, Store,
          const float*, int64_t) {
  TORCH_CHECK(false, "f32_gemm::gemm needs an x86-64 CPU with AVX-512");
}
void transpose(const float*, int64_t, int64_t, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "f32_gemm::transpose needs an x86-64 CPU with AVX-512");
}
}  // namespace f32_gemm

#endif
