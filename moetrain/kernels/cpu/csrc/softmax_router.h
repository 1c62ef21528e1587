// The softmax router's work after its logits GEMM, in one pass over the (T, E) logits each way, fp32, AVX-512
// (softmax_router.cpp). Python: moetrain/model/cpu_router.py.
//
// Why: on ATen the router is ~15 calls per step, each its own pass over (T, E): softmax, the selection scores
// (+ bias), top-k, the gate gather and renormalisation, logsumexp for the z-loss, the mean over tokens for the
// aux loss, the entropy, and their backward passes. Replacing them with one pass each way here took a layer step
// (forward + backward, 4096 tokens, 2 threads) 3.0 ms shorter at 8 experts (68.5 -> 65.5 ms), 3.2 at 64 (76.2 ->
// 73.0) and 4.1 at 32 experts top-2 (docs/moe.md). A row with a NaN logit comes out NaN, as on ATen.
//
// Shape legend: T tokens, E experts, K experts per token.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace softmax_router {

// Per token t, over the experts with active[e] (the others get p = 0 and are never selected):
//   p[t]       = softmax(logits[t])
//   lse[t]     = log sum_e exp(logits[t, e])                                    (the z-loss's input)
//   idx[t, :]  = the K experts with the largest p[t, e] + bias[e], best first; ties: the lower index first
//   gates[t,k] = p[t, idx_k] / max(sum_j p[t, idx_j], 1e-20) if renormalize else p[t, idx_k], times scale
// and over all tokens psum[e] = sum_t p[t, e] (the aux loss's mean is psum / T) and entropy = sum_t
// sum_e p[t, e] (lse[t] - logits[t, e]) (nats). The sums over tokens run in fixed blocks of tokens, so they do
// not depend on the number of threads. Returns (probs_TE, idx_TK int64, gates_TK, lse_T, psum_E, entropy []).
std::vector<at::Tensor> forward(const at::Tensor& logits_TE, const at::Tensor& bias_E, const at::Tensor& active_E,
                                int64_t K, bool renormalize, double scale);

// dL/dlogits from the gradients of forward's differentiable outputs (gates, lse, psum; a missing one counts as
// zero): with dp[t, e] = dpsum[e] + sum_k [idx_k = e] dq[t, k] (dq: the gates' gradient through the
// renormalisation and scale), dlogits[t, e] = p[t, e] (dp[t, e] - sum_j p[t, j] dp[t, j] + dlse[t]).
at::Tensor backward(const at::Tensor& probs_TE, const at::Tensor& idx_TK, const std::optional<at::Tensor>& dgates_TK,
                    const std::optional<at::Tensor>& dlse_T, const std::optional<at::Tensor>& dpsum_E,
                    bool renormalize, double scale);

}  // namespace softmax_router
