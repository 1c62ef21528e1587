// SwiGLU experts over rows grouped by expert, for CPU: y_e = (silu(x_e w1_e) * (x_e w3_e)) w2_e.
//
// Why this exists: with 32-64 experts each expert gets 64-128 rows. A loop of 2-thread GEMMs (what
// torch._grouped_mm does on CPU) splits every small GEMM across both cores and runs the SwiGLU
// elementwise ops as separate passes over (S, F) tensors that no longer sit in cache. Here the cores take
// whole experts from a queue (largest first), run their GEMMs single-threaded (a nested at::parallel_for
// region runs inline, and MKL runs single-threaded inside it) and apply the elementwise ops to one
// expert's (n, F) block while it is still in L2. Every expert is computed by one core with the same ops,
// so results do not depend on which core took it. In fp32 on a CPU with AVX-512 the GEMMs are the kernel's own
// (f32_gemm.cpp) and so are SwiGLU's elementwise passes, sigmoid included (f32_swiglu.cpp); elsewhere the GEMMs
// (MKL), silu and sigmoid are ATen's with a one-pass SwiGLU gradient written here (swiglu_grad_loop). Also
// written here: the per-token gate-weighted sums (combine_rows_loop) and the per-row gate gradient and dy
// (backward_rows).
//
// moe_forward / moe_backward also do the token-level steps around the experts (gather of each expert's rows
// of x, gate-weighted combine per token), so that work happens on blocks in cache too.
//
// Shape legend: S rows sorted by expert, D model dim, F expert hidden dim, E experts, n rows of one expert.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/OpMathType.h>

#include "f32_gemm.h"
#include "f32_swiglu.h"
#include "softmax_router.h"

#include <algorithm>
#include <atomic>
#include <numeric>
#include <vector>

namespace {

struct Groups {
  std::vector<int64_t> start, count;
  std::vector<int64_t> order;  // experts by descending rows: the longest first balances the cores (LPT)
};

Groups make_groups(const std::vector<int64_t>& counts) {
  Groups g;
  int64_t total = 0;
  for (auto c : counts) {
    g.start.push_back(total);
    g.count.push_back(c);
    total += c;
  }
  g.order.resize(counts.size());
  std::iota(g.order.begin(), g.order.end(), 0);
  std::stable_sort(g.order.begin(), g.order.end(), [&](int64_t a, int64_t b) { return counts[a] > counts[b]; });
  return g;
}

// at::mm_out into a view (its out argument binds only to an lvalue).
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

// Runs fn(e, take_next) once for every expert e. take_next() claims the expert the same thread runs after e and
// returns it (-1 when none), so that e's last GEMM can prefetch that expert's first weight. fn claims it before its
// last GEMM, one GEMM earlier than a free core would take from the queue: at the tail the other core may wait for
// that GEMM (experts go largest first, so the last ones are the smallest). When there are enough experts
// for the threads (E >= 2 x threads) and none holds more than a thread's share of the rows, each core takes the next
// expert of the queue (largest first) and runs it single-threaded. Otherwise (few experts for many threads, one
// dominant expert, one thread) the experts run one after another and every GEMM gets all threads, as
// torch._grouped_mm would.
template <typename Fn>
void for_each_expert_ahead(const Groups& g, const Fn& fn) {
  const int64_t E = static_cast<int64_t>(g.order.size());
  const int64_t threads = at::get_num_threads();
  int64_t total = 0, largest = 0;
  for (auto c : g.count) {
    total += c;
    largest = std::max(largest, c);
  }
  if (threads <= 1 || E < 2 * threads || largest * threads > total) {
    for (int64_t i = 0; i < E; ++i) fn(g.order[i], [&] { return i + 1 < E ? g.order[i + 1] : int64_t(-1); });
    return;
  }
  // Worker threads do not inherit the caller's thread-local state (grad mode, inference mode, autocast).
  const at::ThreadLocalState caller_state;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard same_state(caller_state);
    for (int64_t i = next++; i < E;) {
      int64_t after = -1;  // claimed at most once, by take_next
      const auto take_next = [&] {
        if (after < 0) after = next++;
        return after < E ? g.order[after] : int64_t(-1);
      };
      fn(g.order[i], take_next);
      i = after < 0 ? next++ : after;
    }
  });
}

// fn(e) once for every expert, as for_each_expert_ahead.
template <typename Fn>
void for_each_expert(const Groups& g, const Fn& fn) {
  for_each_expert_ahead(g, [&](int64_t e, const auto&) { fn(e); });
}

// One pass over an expert's (n, F) block for float / double: from h1, h3, dg = dL/dg and s = sigmoid(h1)
// (computed by ATen, vectorised) it writes g = silu(h1) h3 (for dW2), dh1 = dg h3 s (1 + h1 (1 - s)) over
// dg, and dh3 = dg silu(h1) over s. Plain arithmetic: the compiler vectorises the loop.
template <typename T>
void swiglu_grad_loop(const T* __restrict h1, const T* __restrict h3, T* __restrict dg_dh1, T* __restrict s_dh3,
                      T* __restrict g, int64_t size) {
  for (int64_t i = 0; i < size; ++i) {
    const T x = h1[i], u = h3[i], d = dg_dh1[i], s = s_dh3[i];
    const T a = x * s;
    g[i] = a * u;
    s_dh3[i] = d * a;
    dg_dh1[i] = d * u * s * (T(1) + x * (T(1) - s));
  }
}

// fn(i0, i1) over the elements [0, numel) of one expert's block: over the threads for one large expert (outside a
// parallel region), inline inside one.
template <typename Fn>
void over_elements(int64_t numel, const Fn& fn) {
  at::parallel_for(0, numel, 1 << 15, fn);
}

// g = silu(h1) * h3 of one expert's contiguous fp32 blocks on the kernel's own AVX-512 code (f32_swiglu).
at::Tensor swiglu_block_f32(const at::Tensor& h1, const at::Tensor& h3) {
  TORCH_CHECK(h1.is_contiguous() && h3.is_contiguous(), "swiglu_block_f32: contiguous h1, h3 blocks");
  auto g = at::empty_like(h1);
  over_elements(g.numel(), [&](int64_t i0, int64_t i1) {
    f32_swiglu::forward(h1.const_data_ptr<float>() + i0, h3.const_data_ptr<float>() + i0, g.data_ptr<float>() + i0,
                        i1 - i0);
  });
  return g;
}

// (g, dh1, dh3) of one expert block; dg must be a fresh contiguous tensor (it is overwritten by dh1). own: fp32
// on the kernel's own AVX-512 code (f32_swiglu: the sigmoid in registers, no separate pass).
std::tuple<at::Tensor, at::Tensor, at::Tensor> swiglu_grad_block(const at::Tensor& h1, const at::Tensor& h3,
                                                                 at::Tensor& dg, bool own = false) {
  if (own) {
    TORCH_CHECK(h1.is_contiguous() && h3.is_contiguous() && dg.is_contiguous(), "swiglu_grad_block: contiguous blocks");
    auto dh3 = at::empty_like(h1), g = at::empty_like(h1);
    over_elements(h1.numel(), [&](int64_t i0, int64_t i1) {
      f32_swiglu::backward(h1.const_data_ptr<float>() + i0, h3.const_data_ptr<float>() + i0, dg.data_ptr<float>() + i0,
                           dh3.data_ptr<float>() + i0, g.data_ptr<float>() + i0, i1 - i0);
    });
    return {g, dg, dh3};
  }
  if (h1.scalar_type() == at::kFloat || h1.scalar_type() == at::kDouble) {
    TORCH_CHECK(h1.is_contiguous() && h3.is_contiguous() && dg.is_contiguous(), "swiglu_grad_block: contiguous blocks");
    auto dh3 = at::sigmoid(h1);  // holds s until the loop overwrites it with dh3
    auto dh1 = dg;                 // holds dg until the loop overwrites it with dh1
    auto g = at::empty_like(h1);
    AT_DISPATCH_FLOATING_TYPES(h1.scalar_type(), "swiglu_grad_block", [&] {
      over_elements(h1.numel(), [&](int64_t i0, int64_t i1) {
        swiglu_grad_loop<scalar_t>(h1.const_data_ptr<scalar_t>() + i0, h3.const_data_ptr<scalar_t>() + i0,
                                   dh1.data_ptr<scalar_t>() + i0, dh3.data_ptr<scalar_t>() + i0,
                                   g.data_ptr<scalar_t>() + i0, i1 - i0);
      });
    });
    return {g, dh1, dh3};
  }
  auto a = at::silu(h1);  // other dtypes (bfloat16): ATen ops, each its own pass
  auto g = a * h3;
  auto dh1 = at::silu_backward(dg * h3, h1);
  return {g, dh1, a.mul_(dg)};
}

// The AVX-512 fp32 GEMMs (f32_gemm.cpp) instead of ATen's, where the CPU has them; tests and the benchmark
// switch them off to compare with ATen's (set_f32_gemm).
std::atomic<bool> f32_gemm_enabled{true};

// Whether one expert's GEMMs run on f32_gemm: fp32, the CPU has AVX-512, and every weight's rows are contiguous
// (f32_gemm reads its B operand by rows; transposed weight views go to ATen).
bool use_f32_gemm(const at::Tensor& x, std::initializer_list<const at::Tensor*> weights) {
  if (x.scalar_type() != at::kFloat || !f32_gemm_enabled || !f32_gemm::available()) return false;
  for (const auto* w : weights)
    if (w->stride(1) != 1) return false;
  return true;
}

// out (=, +=) a b on f32_gemm; a may have any strides, b's and out's rows are contiguous. then: the 2-D weight the
// caller's next GEMM reads (rows contiguous), prefetched during this one.
void mm_f32(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, f32_gemm::Store store = f32_gemm::Store::kWrite,
            const at::Tensor& then = at::Tensor()) {
  const int64_t then_floats = then.defined() ? (then.size(0) - 1) * then.stride(0) + then.size(1) : 0;
  f32_gemm::gemm(a.size(0), b.size(1), a.size(1), a.const_data_ptr<float>(), a.stride(0), a.stride(1),
                 b.const_data_ptr<float>(), b.stride(0), out.data_ptr<float>(), out.stride(0), store,
                 then.defined() ? then.const_data_ptr<float>() : nullptr, then_floats);
}

// A fresh contiguous t^T of a 2-D fp32 block whose rows are contiguous.
at::Tensor transposed(const at::Tensor& t) {
  auto out = at::empty({t.size(1), t.size(0)}, t.options());
  f32_gemm::transpose(t.const_data_ptr<float>(), t.size(0), t.size(1), t.stride(0), out.data_ptr<float>(), t.size(0));
  return out;
}

// One expert's forward on its rows: h1 = x w1, h3 = x w3, y = (silu(h1) * h3) w2, into the given views. w1_next():
// the w1 of the expert this thread runs next (undefined if none), asked for before the last GEMM.
template <typename NextFn>
void expert_forward(const at::Tensor& x_e, const at::Tensor& w1_e, const at::Tensor& w3_e, const at::Tensor& w2_e,
                    at::Tensor h1_e, at::Tensor h3_e, at::Tensor y_e, const NextFn& w1_next) {
  const bool own = use_f32_gemm(x_e, {&w1_e, &w3_e, &w2_e});
  if (!own) {
    mm_into(h1_e, x_e, w1_e);
    mm_into(h3_e, x_e, w3_e);
    mm_into(y_e, at::silu(h1_e).mul_(h3_e), w2_e);
    return;
  }
  // each weight is read once per step, from memory at 32-64 experts: each GEMM prefetches the next one's weight
  using f32_gemm::Store;
  mm_f32(h1_e, x_e, w1_e, Store::kWrite, w3_e);
  mm_f32(h3_e, x_e, w3_e, Store::kWrite, w2_e);
  mm_f32(y_e, swiglu_block_f32(h1_e, h3_e), w2_e, Store::kWrite, w1_next());
}

// num_rows: the rows the experts compute (x's rows, or the kept assignments when the kernel gathers them).
void check_inputs(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2,
                  const std::vector<int64_t>& counts, int64_t num_rows) {
  TORCH_CHECK(x.device().is_cpu(), "swiglu_experts: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && w1.dim() == 3 && w3.dim() == 3 && w2.dim() == 3, "swiglu_experts: x (S, D), w (E, ., .)");
  for (const auto* w : {&w1, &w3, &w2})
    TORCH_CHECK(w->scalar_type() == x.scalar_type() && w->device() == x.device(),
                "swiglu_experts: weights must have x's dtype and device");
  const int64_t E = w1.size(0), D = x.size(1), F = w1.size(2);
  TORCH_CHECK(w1.sizes() == at::IntArrayRef({E, D, F}) && w3.sizes() == w1.sizes() &&
                  w2.sizes() == at::IntArrayRef({E, F, D}),
              "swiglu_experts: w1, w3 (E, D, F) and w2 (E, F, D) with x (S, D)");
  TORCH_CHECK(E == static_cast<int64_t>(counts.size()), "swiglu_experts: one count per expert");
  int64_t total = 0;
  for (auto c : counts) total += c;
  TORCH_CHECK(total == num_rows, "swiglu_experts: counts sum to ", total, " but there are ", num_rows, " rows");
}

// Every expert's forward; x_rows(s, n) is the (n, D) input of sorted rows [s, s + n) (one expert's rows).
// Returns (y_SD, h1_SF, h3_SF).
template <typename RowsFn>
std::vector<at::Tensor> experts_forward(const std::vector<int64_t>& counts, const RowsFn& x_rows, int64_t S,
                                        const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2) {
  const auto g = make_groups(counts);
  const int64_t F = w1.size(2), D = w2.size(2);
  auto y = at::empty({S, D}, w1.options());
  auto h1 = at::empty({S, F}, w1.options());
  auto h3 = at::empty({S, F}, w1.options());
  for_each_expert_ahead(g, [&](int64_t e, const auto& take_next) {
    const int64_t s = g.start[e], n = g.count[e];
    if (n == 0) return;
    const auto w1_next = [&] {
      const int64_t after = take_next();
      return after >= 0 && g.count[after] > 0 ? w1.select(0, after) : at::Tensor();
    };
    expert_forward(x_rows(s, n), w1.select(0, e), w3.select(0, e), w2.select(0, e), h1.narrow(0, s, n),
                   h3.narrow(0, s, n), y.narrow(0, s, n), w1_next);
  });
  return {y, h1, h3};
}

// Which transposes expert_backward_f32 makes for its products with a transposed weight: whichever moves fewer
// elements (the default), or always the weights, or always the expert's row blocks (set_backward_transposes: tests
// force each to show that both give the same bits).
enum : int { kTransposeSmaller = 0, kTransposeWeights = 1, kTransposeRows = 2 };
std::atomic<int> backward_transposes{kTransposeSmaller};

// expert_backward on f32_gemm. Its B operand must have contiguous rows, so a product with a transposed weight
// either transposes the weight (dg = dy w2^T, dx = dh1 w1^T + dh3 w3^T) or is computed transposed with the weight
// as the broadcast operand (dg^T = w2 dy^T, dx^T = w1 dh1^T + w3 dh3^T) with the expert's (n, .) blocks
// transposed around it: whichever moves fewer elements (below). The weight gradients are written with streaming
// stores: nothing reads them before the optimizer.
void expert_backward_f32(const at::Tensor& dy_e, const at::Tensor& x_e, const at::Tensor& w1_e, const at::Tensor& w3_e,
                         const at::Tensor& w2_e, const at::Tensor& h1_e, const at::Tensor& h3_e, at::Tensor dx_e,
                         at::Tensor dw1_e, at::Tensor dw3_e, at::Tensor dw2_e) {
  using f32_gemm::Store;
  const int64_t n = dy_e.size(0), F = w2_e.size(0), D = w2_e.size(1);
  // Either the weight or the expert's blocks get transposed, whichever is smaller: both give the same bits (each
  // output is summed over the same products in the same order, in the same passes over K: the GEMM's order
  // does not depend on which operand is broadcast). dg = dy w2^T moves dy and dg (n (D + F)) or w2 (D F); dx =
  // dh1 w1^T + dh3 w3^T moves dh1, dh3 and dx (n (2 F + D)) or w1 and w3 (2 D F). At d_model 256, d_ff 512 the
  // weights are the smaller above 170 rows for dg and 204 for dx.
  const int mode = backward_transposes;
  const bool weights_for_dg = mode == kTransposeWeights || (mode == kTransposeSmaller && n * (D + F) > D * F);
  const bool weights_for_dx =
      mode == kTransposeWeights || (mode == kTransposeSmaller && n * (2 * F + D) > 2 * D * F);
  at::Tensor dg_e;
  if (weights_for_dg) {
    dg_e = at::empty({n, F}, dy_e.options());
    mm_f32(dg_e, dy_e, transposed(w2_e));
  } else {
    auto dg_t = at::empty({F, n}, dy_e.options());
    mm_f32(dg_t, w2_e, transposed(dy_e));
    dg_e = transposed(dg_t);
  }
  auto [g_e, dh1_e, dh3_e] = swiglu_grad_block(h1_e, h3_e, dg_e, /*own=*/true);
  if (dw2_e.defined()) mm_f32(dw2_e, g_e.t(), dy_e, Store::kStream);
  if (dw1_e.defined()) mm_f32(dw1_e, x_e.t(), dh1_e, Store::kStream);
  if (dw3_e.defined()) mm_f32(dw3_e, x_e.t(), dh3_e, Store::kStream);
  if (!dx_e.defined()) return;
  if (weights_for_dx) {
    mm_f32(dx_e, dh1_e, transposed(w1_e));
    mm_f32(dx_e, dh3_e, transposed(w3_e), Store::kAdd);
    return;
  }
  auto dx_t = at::empty({D, n}, dy_e.options());
  mm_f32(dx_t, w1_e, transposed(dh1_e));
  mm_f32(dx_t, w3_e, transposed(dh3_e), Store::kAdd);
  f32_gemm::transpose(dx_t.const_data_ptr<float>(), D, n, n, dx_e.data_ptr<float>(), dx_e.stride(0));
}

// One expert's backward from dy_e; writes the gradients that are defined (dx_e and the dw_e views).
void expert_backward(const at::Tensor& dy_e, const at::Tensor& x_e, const at::Tensor& w1_e, const at::Tensor& w3_e,
                     const at::Tensor& w2_e, const at::Tensor& h1_e, const at::Tensor& h3_e, at::Tensor dx_e,
                     at::Tensor dw1_e, at::Tensor dw3_e, at::Tensor dw2_e) {
  if (use_f32_gemm(dy_e, {&w1_e, &w3_e, &w2_e}))
    return expert_backward_f32(dy_e, x_e, w1_e, w3_e, w2_e, h1_e, h3_e, dx_e, dw1_e, dw3_e, dw2_e);
  auto dg_e = at::mm(dy_e, w2_e.t());
  auto [g_e, dh1_e, dh3_e] = swiglu_grad_block(h1_e, h3_e, dg_e);
  if (dw2_e.defined()) mm_into(dw2_e, g_e.t(), dy_e);
  if (dw1_e.defined()) mm_into(dw1_e, x_e.t(), dh1_e);
  if (dw3_e.defined()) mm_into(dw3_e, x_e.t(), dh3_e);
  if (dx_e.defined()) {
    mm_into(dx_e, dh1_e, w1_e.t());
    dx_e.addmm_(dh3_e, w3_e.t());
  }
}

at::Tensor select_if(const at::Tensor& t, int64_t e) { return t.defined() ? t.select(0, e) : at::Tensor(); }

// An expert with no rows gets zero weight gradients.
void zero_expert_grads(int64_t e, std::initializer_list<at::Tensor*> grads) {
  for (auto* dw : grads)
    if (dw->defined()) dw->select(0, e).zero_();
}

// pos[t * K + k]: the sorted row of assignment (t, k), -1 where it was dropped.
at::Tensor sorted_positions(const at::Tensor& assignment_A, int64_t num_assignments) {
  auto pos = at::full({num_assignments}, -1, assignment_A.options());
  pos.index_put_({assignment_A}, at::arange(assignment_A.size(0), assignment_A.options()));
  return pos;
}

// out[t] = sum_k w[t, k] * rows[pos[t, k]] over kept assignments (w = 1 without weights), in k order, summed in
// the opmath type (float for bfloat16) and parallel over tokens: no two threads write one token.
template <typename T, typename acc_t = at::opmath_type<T>>
void combine_rows_loop(const T* rows, const acc_t* w, const int64_t* pos, T* out, int64_t num_tokens, int64_t K,
                       int64_t D) {
  at::parallel_for(0, num_tokens, 64, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> acc(D);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t k = 0; k < K; ++k) {
        const int64_t p = pos[t * K + k];
        if (p < 0) continue;
        const acc_t wk = w ? w[t * K + k] : acc_t(1);
        const T* r = rows + p * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += wk * static_cast<acc_t>(r[d]);
      }
      T* o = out + t * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d]);
    }
  });
}

at::Tensor combine_rows(const at::Tensor& rows_AD, const at::Tensor& weights_TK, const at::Tensor& pos, int64_t T,
                        int64_t K) {
  const int64_t D = rows_AD.size(1);
  auto out = at::empty({T, D}, rows_AD.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, rows_AD.scalar_type(), "combine_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* w = weights_TK.defined() ? weights_TK.const_data_ptr<acc_t>() : nullptr;
    combine_rows_loop<scalar_t>(rows_AD.const_data_ptr<scalar_t>(), w, pos.const_data_ptr<int64_t>(),
                                out.data_ptr<scalar_t>(), T, K, D);
  });
  return out;
}

// The rows one expert needs for its backward, in one pass over its assignments i (token t = token[i]):
// dy[i] = gate[i] * dout[t], dgate[i] = <dout[t], y[i]>, x_rows[i] = x[t] (each only where its output is given). The
// products and sums run in the opmath type (float for bfloat16, as the unfused combine's fp32 weighting).
template <typename T, typename acc_t = at::opmath_type<T>>
void backward_rows(const T* dout, const T* y, const T* x, const int64_t* token, const acc_t* gate, int64_t n,
                   int64_t D, T* dy, T* x_rows, acc_t* dgate) {
  constexpr int64_t kLanes = 16;  // independent partial sums, so the dot product vectorises
  for (int64_t i = 0; i < n; ++i) {
    const T* d_t = dout + token[i] * D;
    const T* y_i = y + i * D;
    const acc_t g = gate[i];
    if (dgate) {
      acc_t part[kLanes] = {};
      int64_t d = 0;
      for (; d + kLanes <= D; d += kLanes)
        for (int64_t j = 0; j < kLanes; ++j) part[j] += static_cast<acc_t>(d_t[d + j]) * static_cast<acc_t>(y_i[d + j]);
      for (; d < D; ++d) part[0] += static_cast<acc_t>(d_t[d]) * static_cast<acc_t>(y_i[d]);
      acc_t dot = 0;
      for (int64_t j = 0; j < kLanes; ++j) dot += part[j];
      dgate[i] = dot;
    }
    if (dy) {
      T* dy_i = dy + i * D;
      for (int64_t d = 0; d < D; ++d) dy_i[d] = static_cast<T>(static_cast<acc_t>(d_t[d]) * g);
    }
    if (x_rows) std::copy(x + token[i] * D, x + (token[i] + 1) * D, x_rows + i * D);
  }
}

void check_routing(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& assignment_A) {
  // the gate weighting runs in fp32 or wider: float32 gates for float32 / bfloat16 x, float64 for float64
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "moe_forward/backward: x must be a contiguous (T, D) tensor, got ",
              x.sizes());
  TORCH_CHECK(gates.dim() == 2 && gates.size(0) == x.size(0) && gates.is_contiguous(),
              "moe_forward/backward: gates must be a contiguous (T, K) tensor with T = ", x.size(0), ", got ",
              gates.sizes());
  TORCH_CHECK(gates.scalar_type() == acc_type, "moe_forward/backward: gates must be ", acc_type, " for x of ",
              x.scalar_type(), " (the weighting runs in fp32 or wider), got ", gates.scalar_type());
  TORCH_CHECK(assignment_A.dim() == 1 && assignment_A.scalar_type() == at::kLong && assignment_A.is_contiguous(),
              "moe_forward/backward: assignment_A must be a contiguous int64 vector, got ",
              assignment_A.scalar_type(), " ", assignment_A.sizes());
}

}  // namespace

// Every entry point runs its ATen calls below the autograd dispatch keys (BelowAutograd). They are called from
// inside autograd Functions (cpu_experts.py), whose outputs get their autograd metadata there, so the per-expert
// select / narrow / empty calls need none: below those keys a view is not given a DifferentiableViewMeta and no
// call goes through VariableType. Worker threads inherit the guard with the caller's ThreadLocalState. Measured on
// the 2-core machine, 64 experts of one row with 16 x 16 weights (the per-expert overhead alone): forward 9.2 -> 3.1
// us per expert, backward 14.7 -> 6.1 us (0.9 ms per step at 64 experts).
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// Returns (y_SD, h1_SF, h3_SF); h1 = x w1 and h3 = x w3 are what the backward needs.
std::vector<at::Tensor> swiglu_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3,
                                       const at::Tensor& w2, const std::vector<int64_t>& counts) {
  const BelowAutograd below_autograd;
  check_inputs(x, w1, w3, w2, counts, x.size(0));
  return experts_forward(counts, [&](int64_t s, int64_t n) { return x.narrow(0, s, n); }, x.size(0), w1, w3,
                         w2);
}

// Returns (dx_SD, dw1_EDF, dw3_EDF, dw2_EFD); a gradient not asked for is an undefined tensor.
std::vector<at::Tensor> swiglu_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w1,
                                        const at::Tensor& w3, const at::Tensor& w2, const at::Tensor& h1,
                                        const at::Tensor& h3, const std::vector<int64_t>& counts, bool need_x,
                                        bool need_w1, bool need_w3, bool need_w2) {
  const BelowAutograd below_autograd;
  check_inputs(x, w1, w3, w2, counts, x.size(0));
  const auto g = make_groups(counts);
  at::Tensor dx, dw1, dw3, dw2;
  if (need_x) dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (need_w1) dw1 = at::empty(w1.sizes(), w1.options());
  if (need_w3) dw3 = at::empty(w3.sizes(), w3.options());
  if (need_w2) dw2 = at::empty(w2.sizes(), w2.options());
  for_each_expert(g, [&](int64_t e) {
    const int64_t s = g.start[e], n = g.count[e];
    if (n == 0) return zero_expert_grads(e, {&dw1, &dw3, &dw2});
    expert_backward(dy.narrow(0, s, n), x.narrow(0, s, n), w1.select(0, e), w3.select(0, e), w2.select(0, e),
                    h1.narrow(0, s, n), h3.narrow(0, s, n), need_x ? dx.narrow(0, s, n) : at::Tensor(),
                    select_if(dw1, e), select_if(dw3, e), select_if(dw2, e));
  });
  return {dx, dw1, dw3, dw2};
}

// The whole token-level MoE FFN of one rank: each expert gathers its rows of x_TD (assignment a = t * K + k,
// sorted by expert in assignment_A), runs its SwiGLU, and the outputs are combined per token with the gates:
// out[t] = sum_k gates[t, k] * y[t, k]. Gather and combine happen on blocks in cache instead of as passes over
// (A, D) tensors. Returns (out_TD, y_AD, h1_AF, h3_AF); y (unweighted, sorted) feeds the gate gradient.
std::vector<at::Tensor> moe_forward(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& w1,
                                    const at::Tensor& w3, const at::Tensor& w2, const at::Tensor& assignment_A,
                                    const std::vector<int64_t>& counts) {
  const BelowAutograd below_autograd;
  check_routing(x, gates, assignment_A);
  const int64_t T = x.size(0), K = gates.size(1), A = assignment_A.size(0);
  check_inputs(x, w1, w3, w2, counts, A);
  const auto token_A = at::floor_divide(assignment_A, K);
  auto rows = [&](int64_t s, int64_t n) { return x.index_select(0, token_A.narrow(0, s, n)); };
  auto yh = experts_forward(counts, rows, A, w1, w3, w2);
  const auto& y = yh[0];
  return {combine_rows(y, gates, sorted_positions(assignment_A, T * K), T, K), y, yh[1], yh[2]};
}

// Backward of moe_forward from dout_TD. dgates[t, k] = <dout[t], y[t, k]> (0 where dropped); each expert's
// dy rows are gates * dout[t]; dx[t] sums the expert input gradients of its kept assignments.
// Returns (dx_TD, dgates_TK, dw1, dw3, dw2); a gradient not asked for is an undefined tensor.
std::vector<at::Tensor> moe_backward(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& gates,
                                     const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2,
                                     const at::Tensor& h1, const at::Tensor& h3, const at::Tensor& y,
                                     const at::Tensor& assignment_A, const std::vector<int64_t>& counts, bool need_x,
                                     bool need_gates, bool need_w1, bool need_w3, bool need_w2) {
  const BelowAutograd below_autograd;
  check_routing(x, gates, assignment_A);
  const int64_t T = x.size(0), D = x.size(1), K = gates.size(1), A = assignment_A.size(0);
  TORCH_CHECK(dout.sizes() == x.sizes() && dout.scalar_type() == x.scalar_type() && dout.is_contiguous(),
              "moe_backward: dout must be contiguous like x ", x.sizes(), " ", x.scalar_type(), ", got ",
              dout.sizes(), " ", dout.scalar_type());
  TORCH_CHECK(y.sizes() == at::IntArrayRef({A, D}) && y.scalar_type() == x.scalar_type() && y.is_contiguous(),
              "moe_backward: y must be contiguous (A, D) = (", A, ", ", D, ") of ", x.scalar_type(), ", got ",
              y.sizes(), " ", y.scalar_type());
  const auto token_A = at::floor_divide(assignment_A, K);
  const auto gate_A = gates.reshape(-1).index_select(0, assignment_A);
  check_inputs(x, w1, w3, w2, counts, A);
  const auto g = make_groups(counts);
  at::Tensor dx_A, dgate_A, dw1, dw3, dw2;
  if (need_x) dx_A = at::empty({A, D}, x.options());
  if (need_gates) dgate_A = at::empty({A}, gates.options());
  if (need_w1) dw1 = at::empty(w1.sizes(), w1.options());
  if (need_w3) dw3 = at::empty(w3.sizes(), w3.options());
  if (need_w2) dw2 = at::empty(w2.sizes(), w2.options());
  const bool need_experts = need_x || need_w1 || need_w2 || need_w3;
  for_each_expert(g, [&](int64_t e) {
    const int64_t s = g.start[e], n = g.count[e];
    if (n == 0) return zero_expert_grads(e, {&dw1, &dw3, &dw2});
    const bool need_x_rows = need_w1 || need_w3;  // x feeds only the w1 / w3 gradients
    auto dy_e = need_experts ? at::empty({n, D}, x.options()) : at::Tensor();
    auto x_e = need_x_rows ? at::empty({n, D}, x.options()) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "moe_backward_rows", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_rows<scalar_t>(dout.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>() + s * D,
                              x.const_data_ptr<scalar_t>(), token_A.const_data_ptr<int64_t>() + s,
                              gate_A.const_data_ptr<acc_t>() + s, n, D,
                              need_experts ? dy_e.data_ptr<scalar_t>() : nullptr,
                              need_x_rows ? x_e.data_ptr<scalar_t>() : nullptr,
                              need_gates ? dgate_A.data_ptr<acc_t>() + s : nullptr);
    });
    if (!need_experts) return;
    expert_backward(dy_e, x_e, w1.select(0, e), w3.select(0, e), w2.select(0, e), h1.narrow(0, s, n),
                    h3.narrow(0, s, n), need_x ? dx_A.narrow(0, s, n) : at::Tensor(), select_if(dw1, e),
                    select_if(dw3, e), select_if(dw2, e));
  });
  const auto pos = sorted_positions(assignment_A, T * K);
  at::Tensor dx, dgates;
  if (need_x) dx = combine_rows(dx_A, at::Tensor(), pos, T, K);
  if (need_gates) dgates = at::zeros({T * K}, gates.options()).index_put_({assignment_A}, dgate_A).view({T, K});
  return {dx, dgates, dw1, dw3, dw2};
}

// Turns the AVX-512 fp32 GEMMs on or off (tests and the benchmark compare them with ATen's); returns whether they
// were on. Where the CPU lacks AVX-512 they stay off whatever this says (f32_gemm_active).
bool set_f32_gemm(bool on) { return f32_gemm_enabled.exchange(on); }
bool f32_gemm_active() { return f32_gemm_enabled && f32_gemm::available(); }

// Forces expert_backward_f32's transposes (0: whichever moves fewer elements, 1: the weights, 2: the row blocks);
// returns the previous mode. For tests.
int set_backward_transposes(int mode) {
  TORCH_CHECK(mode >= kTransposeSmaller && mode <= kTransposeRows, "set_backward_transposes: mode 0, 1 or 2, got ",
              mode);
  return backward_transposes.exchange(mode);
}

// out = a b through f32_gemm: a with any strides, b and out with contiguous rows (the router's logits GEMM,
// cpu_experts.KernelLinear, and tests).
void f32_mm(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate, bool stream) {
  TORCH_CHECK(f32_gemm::available(), "f32_mm: this CPU has no AVX-512");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "f32_mm: float32 tensors only");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2 && a.size(1) == b.size(0) && out.size(0) == a.size(0) &&
                  out.size(1) == b.size(1),
              "f32_mm: shapes ", a.sizes(), " x ", b.sizes(), " -> ", out.sizes(), " do not match");
  TORCH_CHECK(b.stride(1) == 1 && out.stride(1) == 1, "f32_mm: b and out need contiguous rows");
  using f32_gemm::Store;
  mm_f32(out, a, b, accumulate ? Store::kAdd : stream ? Store::kStream : Store::kWrite);
}

at::Tensor f32_transpose(const at::Tensor& t) {
  TORCH_CHECK(f32_gemm::available(), "f32_transpose: this CPU has no AVX-512");
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kFloat && t.stride(1) == 1,
              "f32_transpose: a float32 matrix with contiguous rows, got ", t.scalar_type(), " ", t.sizes());
  return transposed(t);
}

// SwiGLU's elementwise passes on the AVX-512 code (for tests): g = silu(h1) h3, and (g, dh1, dh3) from dg.
void check_swiglu_blocks(std::initializer_list<const at::Tensor*> blocks) {
  TORCH_CHECK(f32_gemm::available(), "f32_swiglu: this CPU has no AVX-512");
  for (const auto* t : blocks)
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->sizes() == blocks.begin()[0]->sizes(),
                "f32_swiglu: contiguous float32 blocks of one shape");
}

at::Tensor f32_swiglu_forward(const at::Tensor& h1, const at::Tensor& h3) {
  check_swiglu_blocks({&h1, &h3});
  return swiglu_block_f32(h1, h3);
}

std::vector<at::Tensor> f32_swiglu_backward(const at::Tensor& h1, const at::Tensor& h3, const at::Tensor& dg) {
  check_swiglu_blocks({&h1, &h3, &dg});
  auto dh1 = dg.clone();
  auto [g, dh1_out, dh3] = swiglu_grad_block(h1, h3, dh1, /*own=*/true);
  return {g, dh1_out, dh3};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_f32_gemm", &set_f32_gemm, "turn the AVX-512 fp32 GEMMs on or off; returns the previous setting");
  m.def("set_backward_transposes", &set_backward_transposes,
        "force the own-GEMM backward's transposes (0 smaller, 1 weights, 2 row blocks; for tests)");
  m.def("f32_gemm_active", &f32_gemm_active, "whether expert GEMMs in fp32 run on the AVX-512 kernel");
  m.def("f32_mm", &f32_mm, "out (=, +=) a @ b on the AVX-512 fp32 GEMM (router logits, tests)");
  m.def("f32_transpose", &f32_transpose, "t.T on the AVX-512 transpose (for tests)");
  m.def("f32_swiglu_forward", &f32_swiglu_forward, "silu(h1) * h3 on the AVX-512 code (for tests)");
  m.def("f32_swiglu_backward", &f32_swiglu_backward, "(g, dh1, dh3) of SwiGLU on the AVX-512 code (for tests)");
  m.def("router_forward", &softmax_router::forward, "the softmax router after its logits GEMM, forward (AVX-512)");
  m.def("router_backward", &softmax_router::backward, "the softmax router after its logits GEMM, backward (AVX-512)");
  m.def("swiglu_forward", &swiglu_forward, "grouped SwiGLU experts, forward (CPU)");
  m.def("swiglu_backward", &swiglu_backward, "grouped SwiGLU experts, backward (CPU)");
  m.def("moe_forward", &moe_forward, "gather, SwiGLU experts and gate-weighted combine per token, forward (CPU)");
  m.def("moe_backward", &moe_backward, "gather, SwiGLU experts and gate-weighted combine per token, backward (CPU)");
}
