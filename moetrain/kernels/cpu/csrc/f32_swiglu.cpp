// SwiGLU's elementwise passes in fp32, AVX-512; see f32_swiglu.h for why.
//
// sigmoid(x) = 1 / (1 + exp(-x)) with exp from f32_exp.h (relative error ~1e-7, its argument clamped to
// +-88.376): for h1 < -88.4 the sigmoid comes out as 4.2e-39 instead of smaller, so silu(h1) is
// h1 x 4.2e-39 instead of ~0, a difference that shows only for |h1| near 1e30. A NaN stays NaN (the products
// with h1 carry it); silu(-inf) is -inf here where ATen gives NaN.
#include "f32_swiglu.h"
#include "f32_exp.h"

#include <c10/util/Exception.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

namespace f32_swiglu {
namespace {

using f32_math::exp_ps;

__attribute__((target("avx512f"), always_inline)) inline __m512 sigmoid_ps(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

// 16 lanes of each pass (m masks the last, partial step)
__attribute__((target("avx512f"), always_inline)) inline void forward16(const float* h1, const float* h3, float* g,
                                                                       __mmask16 m) {
  const __m512 x = _mm512_maskz_loadu_ps(m, h1), u = _mm512_maskz_loadu_ps(m, h3);
  _mm512_mask_storeu_ps(g, m, _mm512_mul_ps(_mm512_mul_ps(x, sigmoid_ps(x)), u));
}

__attribute__((target("avx512f"), always_inline)) inline void backward16(const float* h1, const float* h3,
                                                                        float* dg_dh1, float* dh3, float* g,
                                                                        __mmask16 m) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 x = _mm512_maskz_loadu_ps(m, h1), u = _mm512_maskz_loadu_ps(m, h3);
  const __m512 d = _mm512_maskz_loadu_ps(m, dg_dh1), s = sigmoid_ps(x);
  const __m512 a = _mm512_mul_ps(x, s);  // silu(h1)
  _mm512_mask_storeu_ps(g, m, _mm512_mul_ps(a, u));
  _mm512_mask_storeu_ps(dh3, m, _mm512_mul_ps(d, a));
  // dh1 = dg h3 s (1 + h1 (1 - s)), in the order of the scalar loop it replaces
  const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(d, u), s);
  _mm512_mask_storeu_ps(dg_dh1, m, _mm512_mul_ps(ds, _mm512_add_ps(one, _mm512_mul_ps(x, _mm512_sub_ps(one, s)))));
}

__mmask16 tail_mask(int64_t left) { return __mmask16((1u << left) - 1); }

}  // namespace

__attribute__((target("avx512f"))) void forward(const float* h1, const float* h3, float* g, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) forward16(h1 + i, h3 + i, g + i, 0xFFFF);
  if (i < n) forward16(h1 + i, h3 + i, g + i, tail_mask(n - i));
}

__attribute__((target("avx512f"))) void backward(const float* h1, const float* h3, float* dg_dh1, float* dh3, float* g,
                                                int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) backward16(h1 + i, h3 + i, dg_dh1 + i, dh3 + i, g + i, 0xFFFF);
  if (i < n) backward16(h1 + i, h3 + i, dg_dh1 + i, dh3 + i, g + i, tail_mask(n - i));
}

}  // namespace f32_swiglu

#else  // not x86-64: f32_gemm::available() is false and the kernel uses ATen's ops

namespace f32_swiglu {
void forward(const float*, const float*, float*, int64_t) {
  TORCH_CHECK(false, "f32_swiglu::forward needs an x86-64 CPU with AVX-512");
}
void backward(const float*, const float*, float*, float*, float*, int64_t) {
  TORCH_CHECK(false, "f32_swiglu::backward needs an x86-64 CPU with AVX-512");
}
}  // namespace f32_swiglu

#endif
