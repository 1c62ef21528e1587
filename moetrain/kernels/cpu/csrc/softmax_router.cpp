// The softmax router's passes, fp32, AVX-512; see softmax_router.h for what and why.
//
// A row of E logits is read in chunks of 16 lanes, each with two masks: valid (inside E) and active (valid and
// not masked; masked experts load as -inf and come out with p = 0). exp is f32_exp.h's, whose argument is clamped
// at -88.4: a logit that far below the row's maximum gets p = 0 here (ATen's exp gives a denormal or 0). Top-k is
// K rounds of a vector max over the row's scores. Tokens go in blocks of kBlock over the threads; each
// block sums its own share of psum and the entropy, and the blocks are added in order at the end.
#include "softmax_router.h"

#include "f32_exp.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

namespace softmax_router {
namespace {

constexpr int64_t kBlock = 64;  // tokens per block of the sums over tokens: fixed, so they do not depend on threads
constexpr float kMinDenominator = 1e-20f;  // the renormalisation's clamp, as router.combine_gates

// The lanes of each 16-expert chunk of a row.
struct Lanes {
  int64_t E = 0, chunks = 0;
  std::vector<__mmask16> valid, active;
  std::vector<uint8_t> is_active;
  int64_t num_active = 0;
};

// The lanes of E experts, those with active[e] (nullptr: all) active.
Lanes make_lanes(int64_t E, const bool* active) {
  Lanes l;
  l.E = E;
  l.chunks = (E + 15) / 16;
  l.valid.assign(l.chunks, 0);
  l.active.assign(l.chunks, 0);
  for (int64_t e = 0; e < E; ++e) {
    const auto bit = __mmask16(1u << (e % 16));
    const bool on = active == nullptr || active[e];
    l.valid[e / 16] |= bit;
    if (on) l.active[e / 16] |= bit;
    l.is_active.push_back(on);
    l.num_active += on;
  }
  return l;
}

int64_t grain_of(int64_t E) { return std::max<int64_t>(1, 16384 / (kBlock * std::max<int64_t>(E, 16))); }

struct ForwardArgs {
  const float* logits;
  const float* bias;
  float* probs;
  int64_t* idx;
  float* gates;
  float* lse;
  float* psum_blocks;        // (blocks, E), zeroed
  double* entropy_blocks;    // (blocks)
  int64_t T, K;
  bool renormalize;
  float scale;
};

// The K experts of the largest score (p + bias) among the active ones, best first, ties to the lower index: K rounds
// of a max over the row's chunks, each taking the first remaining lane that holds it. score: the row's scores, 16
// per chunk (lanes past E are never used); left: scratch of one mask per chunk. The bias has no NaN (forward checks
// it), nor has p (a row with a NaN logit takes nan_row), so every comparison is ordered. Why not a scalar insertion
// into the K best: at 64 experts it took half of the pass (perf, 1 thread).
__attribute__((target("avx512f"))) void top_k(const float* score, const Lanes& l, int64_t K, __mmask16* left,
                                              int64_t* best_i) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < l.chunks; ++c) left[c] = l.active[c];
  for (int64_t k = 0; k < K; ++k) {
    __m512 vmax = ninf;
    for (int64_t c = 0; c < l.chunks; ++c)
      vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(ninf, left[c], score + 16 * c));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    // K <= the active lanes, so some lane left holds the max (-inf too: an active expert with a -inf bias)
    for (int64_t c = 0; c < l.chunks; ++c) {
      const __mmask16 hit = _mm512_mask_cmp_ps_mask(left[c], _mm512_loadu_ps(score + 16 * c), m, _CMP_EQ_OQ);
      if (hit == 0) continue;
      const int lane = __builtin_ctz(hit);
      best_i[k] = 16 * c + lane;
      left[c] &= __mmask16(~(1u << lane));
      break;
    }
  }
}

// A row with a NaN logit: NaN scores, lse and gates, its share of psum NaN; the experts it "chooses" are the first K
// active ones (any valid index: the NaN gates carry the NaN on).
void nan_row(const ForwardArgs& f, const Lanes& l, int64_t t, float* pt) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  float* part = f.psum_blocks + (t / kBlock) * l.E;
  int64_t k = 0;
  for (int64_t e = 0; e < l.E; ++e) {
    pt[e] = l.is_active[e] ? nan : 0.0f;
    if (l.is_active[e]) part[e] = nan;
    if (l.is_active[e] && k < f.K) f.idx[t * f.K + k++] = e;
  }
  for (k = 0; k < f.K; ++k) f.gates[t * f.K + k] = nan;
  f.lse[t] = nan;
}

__attribute__((target("avx512f"))) void forward_block(const ForwardArgs& f, const Lanes& l, int64_t b) {
  const int64_t E = l.E, K = f.K;
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  float* part = f.psum_blocks + b * E;
  std::vector<float> score(16 * l.chunks);  // a row's p + bias, what top-k ranks
  std::vector<__mmask16> left(l.chunks);
  double entropy = 0;
  for (int64_t t = b * kBlock; t < std::min(f.T, (b + 1) * kBlock); ++t) {
    const float* lt = f.logits + t * E;
    float* pt = f.probs + t * E;
    __m512 vmax = ninf;
    for (int64_t c = 0; c < l.chunks; ++c)
      vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(ninf, l.active[c], lt + 16 * c));
    __mmask16 nan_lanes = 0;  // a NaN logit makes the whole row NaN, as ATen's softmax does (max would drop it)
    for (int64_t c = 0; c < l.chunks; ++c) {
      const __m512 v = _mm512_maskz_loadu_ps(l.active[c], lt + 16 * c);
      nan_lanes |= _mm512_mask_cmp_ps_mask(l.active[c], v, v, _CMP_UNORD_Q);
    }
    if (nan_lanes) {
      nan_row(f, l, t, pt);
      entropy = std::numeric_limits<double>::quiet_NaN();
      continue;
    }
    const float row_max = _mm512_reduce_max_ps(vmax);
    const __m512 m = _mm512_set1_ps(row_max);
    __m512 vz = _mm512_setzero_ps();
    for (int64_t c = 0; c < l.chunks; ++c) {  // pt = exp(l - max), 0 where masked or below exp's range
      const __m512 y = _mm512_sub_ps(_mm512_mask_loadu_ps(ninf, l.active[c], lt + 16 * c), m);
      const __mmask16 keep = l.active[c] & _mm512_cmp_ps_mask(y, _mm512_set1_ps(-f32_math::kExpClamp), _CMP_GE_OQ);
      const __m512 ex = _mm512_maskz_mov_ps(keep, f32_math::exp_ps(y));
      _mm512_mask_storeu_ps(pt + 16 * c, l.valid[c], ex);
      vz = _mm512_add_ps(vz, ex);
    }
    const float z = _mm512_reduce_add_ps(vz);
    const float lse = row_max + std::log(z);
    const __m512 inv = _mm512_set1_ps(1.0f / z), vlse = _mm512_set1_ps(lse);
    __m512 vh = _mm512_setzero_ps();
    for (int64_t c = 0; c < l.chunks; ++c) {  // p, its score, its share of psum and of the entropy p (lse - l)
      const __mmask16 v = l.valid[c];
      const __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(v, pt + 16 * c), inv);
      _mm512_mask_storeu_ps(pt + 16 * c, v, p);
      _mm512_storeu_ps(score.data() + 16 * c, _mm512_add_ps(p, _mm512_maskz_loadu_ps(v, f.bias + 16 * c)));
      _mm512_mask_storeu_ps(part + 16 * c, v, _mm512_add_ps(_mm512_maskz_loadu_ps(v, part + 16 * c), p));
      const __m512 lv = _mm512_maskz_loadu_ps(l.active[c], lt + 16 * c);
      vh = _mm512_mask_add_ps(vh, l.active[c], vh, _mm512_mul_ps(p, _mm512_sub_ps(vlse, lv)));
    }
    entropy += _mm512_reduce_add_ps(vh);
    f.lse[t] = lse;
    int64_t* it = f.idx + t * K;
    top_k(score.data(), l, K, left.data(), it);
    float sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += pt[it[k]];
    const float denominator = std::max(sum, kMinDenominator);
    float* gt = f.gates + t * K;
    for (int64_t k = 0; k < K; ++k) {
      float g = pt[it[k]];
      if (f.renormalize) g = g / denominator;
      if (f.scale != 1.0f) g = g * f.scale;
      gt[k] = g;
    }
  }
  f.entropy_blocks[b] = entropy;
}

struct BackwardArgs {
  const float* probs;
  const int64_t* idx;
  const float* dgates;  // nullptr: zero
  const float* dlse;    // nullptr: zero
  const float* dpsum;   // nullptr: zero
  float* dlogits;
  int64_t K;
  bool renormalize;
  float scale;
};

__attribute__((target("avx512f"))) void backward_tokens(const BackwardArgs& g, const Lanes& l, int64_t t0, int64_t t1) {
  const int64_t E = l.E, K = g.K;
  std::vector<float> dp(l.chunks * 16, 0.0f);
  for (int64_t t = t0; t < t1; ++t) {
    const float* pt = g.probs + t * E;
    if (g.dpsum)
      std::copy(g.dpsum, g.dpsum + E, dp.begin());
    else
      std::fill(dp.begin(), dp.begin() + E, 0.0f);
    if (g.dgates) {  // the gates' gradient through * scale and the renormalisation, onto the chosen p
      const int64_t* it = g.idx + t * K;
      const float* dg = g.dgates + t * K;
      const auto scaled = [&](float d) { return g.scale != 1.0f ? d * g.scale : d; };
      float sum = 0, dot = 0;
      for (int64_t k = 0; k < K; ++k) sum += pt[it[k]];
      const bool clamped = !(sum >= kMinDenominator);  // then the denominator is the constant clamp
      const float denominator = clamped ? kMinDenominator : sum;
      for (int64_t k = 0; k < K; ++k) dot += scaled(dg[k]) * pt[it[k]];
      for (int64_t k = 0; k < K; ++k) {
        const float dgs = scaled(dg[k]);
        dp[it[k]] += g.renormalize ? dgs / denominator - (clamped ? 0.0f : dot / (denominator * denominator)) : dgs;
      }
    }
    __m512 vdot = _mm512_setzero_ps();
    for (int64_t c = 0; c < l.chunks; ++c)
      vdot = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(l.valid[c], pt + 16 * c), _mm512_loadu_ps(dp.data() + 16 * c), vdot);
    const __m512 shift = _mm512_set1_ps((g.dlse ? g.dlse[t] : 0.0f) - _mm512_reduce_add_ps(vdot));
    float* dt = g.dlogits + t * E;
    for (int64_t c = 0; c < l.chunks; ++c) {
      const __m512 p = _mm512_maskz_loadu_ps(l.valid[c], pt + 16 * c);
      const __m512 d = _mm512_add_ps(_mm512_loadu_ps(dp.data() + 16 * c), shift);
      _mm512_mask_storeu_ps(dt + 16 * c, l.valid[c], _mm512_mul_ps(p, d));
    }
  }
}

void check_row_tensor(const at::Tensor& t, int64_t rows, int64_t cols, at::ScalarType type, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.is_contiguous() && t.dim() == 2 &&
                  t.size(0) == rows && t.size(1) == cols,
              "softmax_router: ", what, " must be a contiguous CPU ", type, " (", rows, ", ", cols, ") tensor, got ",
              t.scalar_type(), " ", t.sizes());
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& logits_TE, const at::Tensor& bias_E, const at::Tensor& active_E,
                                int64_t K, bool renormalize, double scale) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // as swiglu_experts.cpp's BelowAutograd
  TORCH_CHECK(__builtin_cpu_supports("avx512f"), "softmax_router: this CPU has no AVX-512");
  TORCH_CHECK(logits_TE.dim() == 2, "softmax_router: logits must be (T, E), got ", logits_TE.sizes());
  const int64_t T = logits_TE.size(0), E = logits_TE.size(1);
  check_row_tensor(logits_TE, T, E, at::kFloat, "logits");
  TORCH_CHECK(bias_E.scalar_type() == at::kFloat && bias_E.numel() == E && bias_E.is_contiguous() &&
                  active_E.numel() == E,
              "softmax_router: bias (float32) and active need E = ", E, " entries");
  const float* bias = bias_E.const_data_ptr<float>();
  TORCH_CHECK(std::none_of(bias, bias + E, [](float b) { return std::isnan(b); }),
              "softmax_router: the selection bias (the router's bias_E, from moe.bias_update_rate balancing) "
              "has NaN entries");
  const auto active = active_E.to(at::kBool).contiguous();
  const auto lanes = make_lanes(E, active.const_data_ptr<bool>());
  TORCH_CHECK(K >= 1 && K <= lanes.num_active, "softmax_router: top_k=", K, " must be between 1 and the ",
              lanes.num_active, " active experts");
  const auto f32 = logits_TE.options();
  auto probs = at::empty({T, E}, f32), gates = at::empty({T, K}, f32), lse = at::empty({T}, f32);
  auto idx = at::empty({T, K}, f32.dtype(at::kLong));
  const int64_t blocks = (T + kBlock - 1) / kBlock;
  auto psum_blocks = at::zeros({blocks, E}, f32);
  auto entropy_blocks = at::empty({blocks}, f32.dtype(at::kDouble));
  const ForwardArgs args{logits_TE.const_data_ptr<float>(), bias_E.const_data_ptr<float>(), probs.data_ptr<float>(),
                         idx.data_ptr<int64_t>(), gates.data_ptr<float>(), lse.data_ptr<float>(),
                         psum_blocks.data_ptr<float>(), entropy_blocks.data_ptr<double>(), T, K, renormalize,
                         static_cast<float>(scale)};
  at::parallel_for(0, blocks, grain_of(E), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) forward_block(args, lanes, b);
  });
  auto psum = at::zeros({E}, f32);
  float* ps = psum.data_ptr<float>();
  double entropy = 0;
  for (int64_t b = 0; b < blocks; ++b) {  // in block order: the same sums on any number of threads
    const float* part = psum_blocks.const_data_ptr<float>() + b * E;
    for (int64_t e = 0; e < E; ++e) ps[e] += part[e];
    entropy += entropy_blocks.const_data_ptr<double>()[b];
  }
  return {probs, idx, gates, lse, psum, at::scalar_tensor(entropy, f32)};
}

at::Tensor backward(const at::Tensor& probs_TE, const at::Tensor& idx_TK, const std::optional<at::Tensor>& dgates_TK,
                    const std::optional<at::Tensor>& dlse_T, const std::optional<at::Tensor>& dpsum_E,
                    bool renormalize, double scale) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // as swiglu_experts.cpp's BelowAutograd
  TORCH_CHECK(__builtin_cpu_supports("avx512f"), "softmax_router: this CPU has no AVX-512");
  const int64_t T = probs_TE.size(0), E = probs_TE.size(1), K = idx_TK.size(1);
  check_row_tensor(probs_TE, T, E, at::kFloat, "probs");
  check_row_tensor(idx_TK, T, K, at::kLong, "idx");
  if (dgates_TK) check_row_tensor(*dgates_TK, T, K, at::kFloat, "dgates");
  if (dlse_T) TORCH_CHECK(dlse_T->scalar_type() == at::kFloat && dlse_T->numel() == T && dlse_T->is_contiguous(),
                          "softmax_router: dlse must be a contiguous float32 (T) tensor");
  if (dpsum_E) TORCH_CHECK(dpsum_E->scalar_type() == at::kFloat && dpsum_E->numel() == E && dpsum_E->is_contiguous(),
                           "softmax_router: dpsum must be a contiguous float32 (E) tensor");
  // every lane of the row takes part: masked experts have p = 0, so their gradient comes out 0
  const auto lanes = make_lanes(E, nullptr);
  auto dlogits = at::empty({T, E}, probs_TE.options());
  const BackwardArgs args{probs_TE.const_data_ptr<float>(),
                          idx_TK.const_data_ptr<int64_t>(),
                          dgates_TK ? dgates_TK->const_data_ptr<float>() : nullptr,
                          dlse_T ? dlse_T->const_data_ptr<float>() : nullptr,
                          dpsum_E ? dpsum_E->const_data_ptr<float>() : nullptr,
                          dlogits.data_ptr<float>(),
                          K,
                          renormalize,
                          static_cast<float>(scale)};
  at::parallel_for(0, T, kBlock * grain_of(E), [&](int64_t t0, int64_t t1) { backward_tokens(args, lanes, t0, t1); });
  return dlogits;
}

}  // namespace softmax_router

#else  // not x86-64: the router's Python side keeps ATen's ops (cpu_router.supported is false there)

namespace softmax_router {
std::vector<at::Tensor> forward(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool, double) {
  TORCH_CHECK(false, "softmax_router needs an x86-64 CPU with AVX-512");
}
at::Tensor backward(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, double) {
  TORCH_CHECK(false, "softmax_router needs an x86-64 CPU with AVX-512");
}
}  // namespace softmax_router

#endif
