// SwiGLU experts over rows grouped by expert, for CPU: y_e = (silu(x_e w1_e) * (x_e w3_e)) w2_e.
//
// Why this exists: with 32-64 experts each expert gets 64-128 rows. A loop of 2-thread GEMMs (what
// torch._grouped_mm does on CPU) splits every small GEMM across both cores and runs the SwiGLU
// elementwise ops as separate passes over (S, F) tensors that no longer sit in cache. Here the cores take
// whole experts from a queue (largest first), run their GEMMs single-threaded (a nested at::parallel_for
// region runs inline, and MKL runs single-threaded inside it) and apply the elementwise ops to one
// expert's (n, F) block while it is still in L2. Every expert is computed by one core with the same ops,
// so results do not depend on which core took it. The GEMMs (MKL), silu and sigmoid are ATen's; the only
// arithmetic written here is the one-pass SwiGLU gradient of swiglu_grad_loop.
//
// Shape legend: S rows sorted by expert, D model dim, F expert hidden dim, E experts, n rows of one expert.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

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

// Runs fn(e) once for every expert. When there are enough experts for the threads (E >= 2 x threads) and
// none holds more than a thread's share of the rows, each core takes the next expert of the queue (largest
// first) and runs it single-threaded. Otherwise (few experts for many threads, one dominant expert, one
// thread) the experts run one after another and every GEMM gets all threads, as torch._grouped_mm would.
template <typename Fn>
void for_each_expert(const Groups& g, const Fn& fn) {
  const int64_t E = static_cast<int64_t>(g.order.size());
  const int64_t threads = at::get_num_threads();
  int64_t total = 0, largest = 0;
  for (auto c : g.count) {
    total += c;
    largest = std::max(largest, c);
  }
  if (threads <= 1 || E < 2 * threads || largest * threads > total) {
    for (auto e : g.order) fn(e);
    return;
  }
  // Worker threads do not inherit the caller's thread-local state (grad mode, inference mode, autocast).
  const at::ThreadLocalState caller_state;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard same_state(caller_state);
    for (int64_t i = next++; i < E; i = next++) fn(g.order[i]);
  });
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

// (g, dh1, dh3) of one expert block; dg must be a fresh contiguous tensor (it is overwritten by dh1).
std::tuple<at::Tensor, at::Tensor, at::Tensor> swiglu_grad_block(const at::Tensor& h1, const at::Tensor& h3,
                                                                 at::Tensor& dg) {
  if (h1.scalar_type() == at::kFloat || h1.scalar_type() == at::kDouble) {
    TORCH_CHECK(h1.is_contiguous() && h3.is_contiguous() && dg.is_contiguous(), "swiglu_grad_block: contiguous blocks");
    auto dh3 = at::sigmoid(h1);  // holds s until the loop overwrites it with dh3
    auto dh1 = dg;                 // holds dg until the loop overwrites it with dh1
    auto g = at::empty_like(h1);
    AT_DISPATCH_FLOATING_TYPES(h1.scalar_type(), "swiglu_grad_block", [&] {
      swiglu_grad_loop<scalar_t>(h1.const_data_ptr<scalar_t>(), h3.const_data_ptr<scalar_t>(),
                                 dh1.data_ptr<scalar_t>(), dh3.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), h1.numel());
    });
    return {g, dh1, dh3};
  }
  auto a = at::silu(h1);  // other dtypes (bfloat16): ATen ops, each its own pass
  auto g = a * h3;
  auto dh1 = at::silu_backward(dg * h3, h1);
  return {g, dh1, a.mul_(dg)};
}

void check_inputs(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2,
                  const std::vector<int64_t>& counts) {
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
  TORCH_CHECK(total == x.size(0), "swiglu_experts: counts sum to ", total, " but x has ", x.size(0), " rows");
}

}  // namespace

// Returns (y_SD, h1_SF, h3_SF); h1 = x w1 and h3 = x w3 are what the backward needs.
std::vector<at::Tensor> swiglu_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3,
                                       const at::Tensor& w2, const std::vector<int64_t>& counts) {
  check_inputs(x, w1, w3, w2, counts);
  const auto g = make_groups(counts);
  const int64_t S = x.size(0), F = w1.size(2), D = w2.size(2);
  auto y = at::empty({S, D}, x.options());
  auto h1 = at::empty({S, F}, x.options());
  auto h3 = at::empty({S, F}, x.options());
  for_each_expert(g, [&](int64_t e) {
    const int64_t s = g.start[e], n = g.count[e];
    if (n == 0) return;
    auto x_e = x.narrow(0, s, n);
    auto h1_e = h1.narrow(0, s, n), h3_e = h3.narrow(0, s, n), y_e = y.narrow(0, s, n);
    mm_into(h1_e, x_e, w1.select(0, e));
    mm_into(h3_e, x_e, w3.select(0, e));
    mm_into(y_e, at::silu(h1_e).mul_(h3_e), w2.select(0, e));
  });
  return {y, h1, h3};
}

// Returns (dx_SD, dw1_EDF, dw3_EDF, dw2_EFD); a gradient not asked for is an undefined tensor.
std::vector<at::Tensor> swiglu_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w1,
                                        const at::Tensor& w3, const at::Tensor& w2, const at::Tensor& h1,
                                        const at::Tensor& h3, const std::vector<int64_t>& counts, bool need_x,
                                        bool need_w1, bool need_w3, bool need_w2) {
  check_inputs(x, w1, w3, w2, counts);
  const auto g = make_groups(counts);
  at::Tensor dx, dw1, dw3, dw2;
  if (need_x) dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (need_w1) dw1 = at::empty(w1.sizes(), w1.options());
  if (need_w3) dw3 = at::empty(w3.sizes(), w3.options());
  if (need_w2) dw2 = at::empty(w2.sizes(), w2.options());
  for_each_expert(g, [&](int64_t e) {
    const int64_t s = g.start[e], n = g.count[e];
    if (n == 0) {
      for (auto* dw : {&dw1, &dw3, &dw2})
        if (dw->defined()) dw->select(0, e).zero_();
      return;
    }
    auto x_e = x.narrow(0, s, n), dy_e = dy.narrow(0, s, n);
    auto h1_e = h1.narrow(0, s, n), h3_e = h3.narrow(0, s, n);
    auto w1_e = w1.select(0, e), w3_e = w3.select(0, e), w2_e = w2.select(0, e);
    auto dg_e = at::mm(dy_e, w2_e.t());
    auto [g_e, dh1_e, dh3_e] = swiglu_grad_block(h1_e, h3_e, dg_e);
    if (need_w2) mm_into(dw2.select(0, e), g_e.t(), dy_e);
    if (need_w1) mm_into(dw1.select(0, e), x_e.t(), dh1_e);
    if (need_w3) mm_into(dw3.select(0, e), x_e.t(), dh3_e);
    if (need_x) {
      auto dx_e = dx.narrow(0, s, n);
      mm_into(dx_e, dh1_e, w1_e.t());
      dx_e.addmm_(dh3_e, w3_e.t());
    }
  });
  return {dx, dw1, dw3, dw2};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("swiglu_forward", &swiglu_forward, "grouped SwiGLU experts, forward (CPU)");
  m.def("swiglu_backward", &swiglu_backward, "grouped SwiGLU experts, backward (CPU)");
}
