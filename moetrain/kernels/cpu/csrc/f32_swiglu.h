// SwiGLU's elementwise passes in fp32, AVX-512 (f32_swiglu.cpp): the expert kernel runs them with its own GEMM.
//
// Why not ATen's silu / sigmoid / mul: each is its own pass over an expert's (n, F) block with its own output
// tensor, and each call costs a dispatch (~3-5 us). With 64 experts that is ~200 calls per step whatever the
// number of tokens, and with 8 experts of 1024 rows (2 MiB per block, more than L2) each pass goes to L3. One
// pass here reads h1 and h3 once and computes the sigmoid in registers. Where the CPU lacks AVX-512 the kernel
// keeps ATen's ops (f32_gemm::available() is false there).
#pragma once

#include <cstdint>

namespace f32_swiglu {

// g[i] = silu(h1[i]) * h3[i], silu(x) = x * sigmoid(x).
void forward(const float* h1, const float* h3, float* g, int64_t n);

// The SwiGLU gradient from h1, h3 and dg = dL/dg, s = sigmoid(h1): g = silu(h1) h3 (for dW2),
// dh1 = dg h3 s (1 + h1 (1 - s)), dh3 = dg silu(h1). dg_dh1 holds dg on entry and dh1 on return.
void backward(const float* h1, const float* h3, float* dg_dh1, float* dh3, float* g, int64_t n);

}  // namespace f32_swiglu
