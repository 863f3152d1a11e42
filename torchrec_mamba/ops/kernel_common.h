// Shared helpers of the compiled CPU kernels (selective_scan.cpp, state_update.cpp,
// causal_conv1d.cpp, dropout.cpp): thread helpers, branch-free exp / exp2 / softplus / sigmoid
// that the compiler vectorises, the float vector type of the channel-vectorised kernels, and the
// forward recurrence of the selective SSM, written once (ssm_step) and used by the scan forward,
// the backward's recompute and the one-step state update.
//
// exp, exp2 and log are branch-free polynomials so that the compiler vectorises them (max error
// <= 2 ulp for exp/exp2, 4 ulp for softplus in float; 1.5 ulp for exp in double; inf and NaN
// propagate). Build with -fno-trapping-math, or GCC will not if-convert the clamps.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace torchrec_mamba_cpu {

#ifdef _OPENMP
inline int thread_id() { return omp_get_thread_num(); }
inline bool in_parallel() { return omp_in_parallel() != 0; }
#else
inline int thread_id() { return 0; }
inline bool in_parallel() { return false; }
#endif

// Threads for `items` independent work items: 1 inside someone's parallel region.
inline int num_threads_for(int64_t items) {
  if (in_parallel()) return 1;
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), items);
  return static_cast<int>(std::max<int64_t>(nt, 1));
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// exp(x) for float: Cephes range reduction and polynomial; 2^k is applied in two halves so that
// results in the subnormal range and overflow to +inf come out right.
#pragma omp declare simd
inline float fast_exp(float x) {
  x = x > 89.0f ? 89.0f : x;  // written so that NaN falls through both clamps
  x = x < -104.0f ? -104.0f : x;
  // Round to nearest with the 1.5 * 2^23 trick: std::floor/nearbyint would be library calls
  // that stop the loop from vectorising.
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t ki = static_cast<int32_t>(k);
  const int32_t k1 = ki >> 1;
  const int32_t k2 = ki - k1;
  const float s1 = __builtin_bit_cast(float, static_cast<uint32_t>(k1 + 127) << 23);
  const float s2 = __builtin_bit_cast(float, static_cast<uint32_t>(k2 + 127) << 23);
  return y * s1 * s2;
}

// exp(x) for double: Cephes range reduction and Pade approximant, same two-half scaling.
#pragma omp declare simd
inline double fast_exp(double x) {
  x = x > 710.0 ? 710.0 : x;
  x = x < -746.0 ? -746.0 : x;
  const double k = (x * 1.4426950408889634074 + 6755399441055744.0) - 6755399441055744.0;
  double r = x - k * 6.93145751953125e-1;
  r = r - k * 1.42860682030941723212e-6;
  const double rr = r * r;
  const double px =
      r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr +
           9.99999999999999999910e-1);
  const double qx = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr +
                     2.27265548208155028766e-1) *
                        rr +
                    2.00000000000000000009e0;
  const double y = 1.0 + 2.0 * px / (qx - px);
  const int32_t ki = static_cast<int32_t>(k);  // |k| <= 1077: int32 converts in SIMD on AVX2
  const int32_t k1 = ki >> 1;
  const int32_t k2 = ki - k1;
  const double s1 = __builtin_bit_cast(double, static_cast<uint64_t>(k1 + 1023) << 52);
  const double s2 = __builtin_bit_cast(double, static_cast<uint64_t>(k2 + 1023) << 52);
  return y * s1 * s2;
}

// 2^x for float: round to the nearest integer k, a degree-6 polynomial for 2^(x - k) on
// [-1/2, 1/2] (Chebyshev fit, max error 1.7 ulp), then the two-half scaling as above. The scan
// calls it with A pre-scaled by log2(e), which saves the Cody-Waite reduction of exp (~15%).
#pragma omp declare simd
inline float fast_exp2(float x) {
  x = x > 129.0f ? 129.0f : x;  // NaN falls through
  x = x < -150.0f ? -150.0f : x;
  const float k = (x + 12582912.0f) - 12582912.0f;
  const float r = x - k;
  float p = 1.5469732170458883e-4f;
  p = p * r + 1.3400432653725147e-3f;
  p = p * r + 9.6180252730846405e-3f;
  p = p * r + 5.5503271520137787e-2f;
  p = p * r + 2.4022650718688965e-1f;
  p = p * r + 6.9314718246459961e-1f;
  p = p * r + 1.0f;
  const int32_t ki = static_cast<int32_t>(k);
  const int32_t k1 = ki >> 1;
  const int32_t k2 = ki - k1;
  const float s1 = __builtin_bit_cast(float, static_cast<uint32_t>(k1 + 127) << 23);
  const float s2 = __builtin_bit_cast(float, static_cast<uint32_t>(k2 + 127) << 23);
  return p * s1 * s2;
}

// The decay exp(dt * A) is computed as decay_exp((dt * kDecayScale) * A): 2^x in float with dt
// pre-scaled by log2(e), plain exp in double (the accuracy mode keeps its one rounding).
#pragma omp declare simd
inline float decay_exp(float x) { return fast_exp2(x); }
#pragma omp declare simd
inline double decay_exp(double x) { return fast_exp(x); }

template <typename T>
constexpr T kDecayScale = T(1);
template <>
constexpr float kDecayScale<float> = 1.44269504088896341f;

// log(u) for u in [1, 2]: Cephes logf polynomial after reducing to [sqrt(1/2), sqrt(2)].
#pragma omp declare simd
inline float log_1_2(float u) {
  const bool big = u > 1.41421356237f;
  const float e = big ? 1.0f : 0.0f;
  const float x = (big ? 0.5f * u : u) - 1.0f;
  const float z = x * x;
  float p = 7.0376836292e-2f;
  p = p * x - 1.1514610310e-1f;
  p = p * x + 1.1676998740e-1f;
  p = p * x - 1.2420140846e-1f;
  p = p * x + 1.4249322787e-1f;
  p = p * x - 1.6668057665e-1f;
  p = p * x + 2.0000714765e-1f;
  p = p * x - 2.4999993993e-1f;
  p = p * x + 3.3333331174e-1f;
  float y = x * z * p;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return (x + y) + 0.693359375f * e;
}

// torch.nn.functional.softplus (beta=1, threshold=20), as max(x, 0) + log1p(exp(-|x|)) with
// Kahan's log1p(w) = log(1 + w) * w / ((1 + w) - 1); branch-free so that rows vectorise.
// Max error 4 ulp outside the subnormal range.
#pragma omp declare simd
inline float softplus(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float w = fast_exp(-ax);  // (0, 1]
  const float u = 1.0f + w;
  const float um1 = u - 1.0f;
  const float l1p = um1 == 0.0f ? w : log_1_2(u) * (w / (um1 == 0.0f ? 1.0f : um1));
  const float sp = (x > 0.0f ? x : 0.0f) + l1p;
  return x > 20.0f ? x : sp;
}

// fp64 is the accuracy mode: the library functions are fine there.
inline double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + fast_exp(-x));
}

// Derivative of softplus (threshold 20, as torch).
template <typename T>
inline T softplus_grad(T x) {
  return x > T(20) ? T(1) : sigmoid(x);
}

// ---------------------------------------------------------------------------------------------
// float32: the channel-vectorised kernel. One SIMD vector holds kLanes channels of one batch
// row, so every per-(b, d, t) scalar (dt, u, the output, du, d delta) is one vector op and the
// sum over the state index n is a plain vertical FMA: no horizontal reductions in the
// recurrence. B_t[n] and C_t[n] are shared by all channels of a batch row and are broadcast.
// The loop over n runs over the state held in (L1-resident) scratch, so any N works. The rows
// of u, delta, z and dy are transposed into (L, kLanes) tiles first (a partial last block is
// zero-padded: A = 0 and u = 0 keep its state at 0); results are transposed back.
// With AVX-512 the decay 2^x uses vrndscaleps / vscalefps (exact scaling, no clamps needed).
// ---------------------------------------------------------------------------------------------

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;  // one AVX2 register; wider GCC vectors lower badly there
#endif
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vf vsplat(float x) { return vf{} + x; }

// 2^x on a vector: round to nearest k, the degree-6 polynomial of fast_exp2 for 2^(x - k),
// then scale by 2^k. Max error 1.7 ulp; NaN propagates; x <= -150 gives 0 (-inf included),
// x >= 129 gives inf (with AVX-512, +inf itself gives NaN: the scan's exponents dt * A are
// <= 0 whenever A <= 0, and vscalefps saturates any finite x, so only the lower clamp is kept:
// one instruction less in the scan's innermost loop).
inline vf vexp2(vf x) {
#if defined(__AVX512F__)
  // (c, x): max returns its second operand when one is NaN, so NaN in x propagates.
  const __m512 xm = _mm512_max_ps(_mm512_set1_ps(-151.0f), (__m512)x);
  const __m512 k = _mm512_roundscale_ps(xm, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf r = (vf)_mm512_sub_ps(xm, k);
#else
  x = x > 129.0f ? vsplat(129.0f) : x;  // NaN falls through both
  x = x < -150.0f ? vsplat(-150.0f) : x;
  const vf k = (x + 12582912.0f) - 12582912.0f;
  const vf r = x - k;
#endif
  // Degree-5 least-squares fit on Chebyshev nodes: max relative error 1.5 * 2^-23.
  vf p = vsplat(1.32187e-3f);
  p = p * r + 9.67171e-3f;
  p = p * r + 5.550893e-2f;
  p = p * r + 2.4022238e-1f;
  p = p * r + 6.9314686e-1f;
  p = p * r + 1.0f;
#if defined(__AVX512F__)
  return (vf)_mm512_scalef_ps((__m512)p, k);
#else
  const vi ki = __builtin_convertvector(k, vi);
  const vi k1 = ki >> 1;
  const vi k2 = ki - k1;
  const vf s1 = (vf)((k1 + 127) << 23);
  const vf s2 = (vf)((k2 + 127) << 23);
  return p * s1 * s2;
#endif
}

inline float vsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
#endif
}

// out[j] = vsum(v[j]) for j < n, 16 sums per transposing add tree with AVX-512 (about 3
// instructions per sum instead of 9 for one horizontal reduction each).
inline void vsum_many(const vf* __restrict v, int64_t n, float* __restrict out) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= n; j += 16) {
    const __m512* w = reinterpret_cast<const __m512*>(v + j);
    __m512 q[4];
    for (int g = 0; g < 4; ++g) {  // 4 inputs -> per 128-bit lane l: [sum_l a, b, c, d]
      const __m512 a = w[4 * g], b = w[4 * g + 1], c = w[4 * g + 2], d = w[4 * g + 3];
      const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
      const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
      q[g] = _mm512_add_ps(
          _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
          _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
    }
    // Add the 128-bit lanes: [q0 l0+l1, q0 l2+l3, q1 l0+l1, q1 l2+l3], then across pairs.
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(q[0], q[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(q[0], q[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(q[2], q[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(q[2], q[3], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 all = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_ps(out + j, all);
  }
#endif
  for (; j < n; ++j) out[j] = vsum(v[j]);
}

inline vf vsigmoid(vf x) {
  vf s;
  const float* xs = reinterpret_cast<const float*>(&x);
  float* ss = reinterpret_cast<float*>(&s);
#pragma omp simd
  for (int c = 0; c < kLanes; ++c) ss[c] = 1.0f / (1.0f + fast_exp(-xs[c]));
  return s;
}

inline vf decay_exp(vf x) { return vexp2(x); }

// ---------------------------------------------------------------------------------------------
// The forward recurrence of the selective SSM, written once. One step of one state row:
//   a[n] = exp(dt * A[n]) = decay_exp(dts * A[n])      (dts = dt * kDecayScale)
//   h[n] = a[n] * h_prev[n] + dtu * B[n]                (dtu = dt * u)
//   returns sum_n C[n] * h[n]
// V is float or double (one channel; the loop over n vectorises) or vf (kLanes channels of one
// batch row, one vector per n; B and C are scalars shared by those channels). h_prev may be h
// itself (an in-place update). kZeroPrev: the previous state is zero (h_prev unused).
// kKeepDecay: also store a[n] in decay (the backward reuses the decays).
// ---------------------------------------------------------------------------------------------

template <bool kZeroPrev, bool kKeepDecay, typename V, typename S>
inline V ssm_update(V dts, V dtu, V a_n, V h_prev_n, S b_n, V* decay_n, V* h_n) {
  const V a = decay_exp(dts * a_n);
  if constexpr (kKeepDecay) *decay_n = a;
  const V h = kZeroPrev ? dtu * b_n : a * h_prev_n + dtu * b_n;
  *h_n = h;
  return h;
}

template <bool kZeroPrev = false, bool kKeepDecay = false, typename V, typename S>
inline V ssm_step(V dts, V dtu, const V* A, const V* h_prev, V* h, V* decay, const S* Bn,
                  const S* Cn, int64_t N) {
  if constexpr (std::is_floating_point_v<V>) {
    V acc = V(0);
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < N; ++n) {
      const V hp = kZeroPrev ? V(0) : h_prev[n];
      V* dn = kKeepDecay ? decay + n : nullptr;
      acc += Cn[n] * ssm_update<kZeroPrev, kKeepDecay>(dts, dtu, A[n], hp, Bn[n], dn, h + n);
    }
    return acc;
  } else {
    // Two independent accumulators: the FMA latency, not the throughput, bounds one chain.
    V acc0{}, acc1{};
    int64_t n = 0;
    for (; n + 1 < N; n += 2) {
      const V hp0 = kZeroPrev ? V{} : h_prev[n];
      const V hp1 = kZeroPrev ? V{} : h_prev[n + 1];
      acc0 += ssm_update<kZeroPrev, kKeepDecay>(dts, dtu, A[n], hp0, Bn[n], decay + n, h + n) * Cn[n];
      acc1 += ssm_update<kZeroPrev, kKeepDecay>(dts, dtu, A[n + 1], hp1, Bn[n + 1], decay + n + 1,
                                                h + n + 1) * Cn[n + 1];
    }
    if (n < N) {
      const V hp0 = kZeroPrev ? V{} : h_prev[n];
      acc0 += ssm_update<kZeroPrev, kKeepDecay>(dts, dtu, A[n], hp0, Bn[n], decay + n, h + n) * Cn[n];
    }
    return acc0 + acc1;
  }
}

}  // namespace torchrec_mamba_cpu
