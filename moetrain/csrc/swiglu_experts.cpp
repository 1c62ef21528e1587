// SwiGLU experts over rows grouped by expert, for CPU: y_e = (silu(x_e w1_e) * (x_e w3_e)) w2_e.
//
// Why this exists: with 32-64 experts each expert gets 64-128 rows. A loop of 2-thread GEMMs (what
// torch._grouped_mm does on CPU) splits every small GEMM across both cores and runs the SwiGLU
// elementwise ops as separate passes over (S, F) tensors that no longer sit in cache. Here each core takes
// a contiguous run of experts holding about half the rows, runs their GEMMs single-threaded (a nested
// at::parallel_for region runs inline, and MKL runs single-threaded inside it) and applies the
// elementwise ops to one expert's (n, F) block while it is still in L2. All arithmetic is ATen's (MKL
// GEMMs, vectorised silu / silu_backward); this file only decides the order and the core.
//
// Shape legend: S rows sorted by expert, D model dim, F expert hidden dim, E experts, n rows of one expert.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

struct Groups {
  std::vector<int64_t> start, count;
  std::vector<int64_t> bounds;  // expert ranges per core: [bounds[p], bounds[p+1])
};

Groups make_groups(const std::vector<int64_t>& counts) {
  Groups g;
  const int64_t E = static_cast<int64_t>(counts.size());
  int64_t total = 0;
  for (auto c : counts) {
    g.start.push_back(total);
    g.count.push_back(c);
    total += c;
  }
  // Contiguous runs of experts with about equal rows: an expert goes to the run its midpoint falls in.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), E));
  g.bounds.push_back(0);
  int64_t e = 0;
  for (int64_t p = 1; p < parts; ++p) {
    while (e < E && (g.start[e] + counts[e] / 2) * parts < total * p) ++e;
    g.bounds.push_back(e);
  }
  g.bounds.push_back(E);
  return g;
}

// at::mm_out into a view (its out argument binds only to an lvalue).
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

template <typename Fn>
void for_each_expert(const Groups& g, const Fn& fn) {
  const int64_t parts = static_cast<int64_t>(g.bounds.size()) - 1;
  auto run = [&](int64_t p0, int64_t p1) {
    at::NoGradGuard no_grad;  // grad mode is thread-local: worker threads start with it on
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t e = g.bounds[p]; e < g.bounds[p + 1]; ++e) fn(e);
  };
  if (parts == 1) {
    run(0, 1);  // one run of experts: let each GEMM use every thread
  } else {
    at::parallel_for(0, parts, 1, run);
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2,
                  const std::vector<int64_t>& counts) {
  TORCH_CHECK(x.device().is_cpu(), "swiglu_experts: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && w1.dim() == 3 && w3.dim() == 3 && w2.dim() == 3, "swiglu_experts: x (S, D), w (E, ., .)");
  TORCH_CHECK(w1.size(0) == static_cast<int64_t>(counts.size()), "swiglu_experts: one count per expert");
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
    auto a_e = at::silu(h1_e);
    if (need_w2) mm_into(dw2.select(0, e), (a_e * h3_e).t(), dy_e);
    auto dh1_e = at::silu_backward(dg_e * h3_e, h1_e);
    auto dh3_e = a_e.mul_(dg_e);
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
