// exp(x) for 16 fp32 lanes, AVX-512; shared by SwiGLU's sigmoid (f32_swiglu.cpp) and the router's softmax
// (softmax_router.cpp).
//
// Range reduction: exp(y) = 2^n exp(r), n = round(y log2(e)), r = y - n ln 2 (ln 2 in two parts, so r is exact to
// fp32), exp(r) by Cephes' degree-6 polynomial on |r| <= ln(2) / 2 (relative error ~1e-7), 2^n by vscalefps. y is
// clamped to +-88.376 (exp's fp32 range, so 2^n stays finite): below it the result is 4.2e-39, not smaller.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

namespace f32_math {

constexpr float kExpClamp = 88.3762626647949f;

__attribute__((target("avx512f"), always_inline)) inline __m512 exp_ps(__m512 y) {
  y = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-kExpClamp)), _mm512_set1_ps(kExpClamp));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), y);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

}  // namespace f32_math

#endif
