// FastDropout's CPU kernels: seeded dropout (counter-based 16-bit draws and the mask in one pass;
// the backward regenerates the mask from the seed instead of keeping it) and GELU fused with its
// dropout (the FFN activation). The Python ops are in dropout.py beside this file.

#include "kernel_common.h"

#include <type_traits>

namespace {

using namespace torchrec_mamba_cpu;

// The 16-bit uniform draws come from a counter-based hash (splitmix64 of the seed and the index
// of each group of four elements), so any thread count gives the same draws; the seed is drawn
// from torch's generator by the caller, so torch.manual_seed makes it reproducible.
inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline uint64_t mix_seed(int64_t seed) { return static_cast<uint64_t>(seed) * 0xD1B54A32D192ED03ull; }

// The kernels generate the draws block by block into a stack buffer that stays in L1 instead of
// writing them to memory: the backward regenerates the mask from the seed, so nothing per
// element is kept between the passes. kBlock elements (a multiple of 4) per block.
constexpr int64_t kBlock = 4096;

// keep[i] = scale where the draw of element start + i is >= threshold, else 0, for the
// elements [start, start + len) (start a multiple of 4): the mask of one block as multipliers.
template <typename T>
inline void block_keep(uint64_t s, int64_t start, int64_t len, int32_t thr, T scale,
                       T* __restrict keep) {
  const int64_t g0 = start / 4;
  const int64_t ng = (len + 3) / 4;
  alignas(64) uint64_t words[kBlock / 4];
#pragma omp simd
  for (int64_t g = 0; g < ng; ++g) words[g] = splitmix64(s + static_cast<uint64_t>(g0 + g));
  // Little-endian: element 4g + j holds bits [16j, 16j + 16) of word g (the int16 view).
  const int16_t* __restrict d = reinterpret_cast<const int16_t*>(words);
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) keep[i] = static_cast<int32_t>(d[i]) >= thr ? scale : T(0);
}

void check_dense(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              name, ": tensors must be contiguous float32/float64 CPU tensors");
}

// Exact (erf) GELU and its derivative. float: erf by Abramowitz & Stegun 7.1.26 (absolute error
// <= 1.5e-7, the approximation PyTorch's own vectorised CPU GELU uses) with the vectorisable
// fast_exp, so the loops vectorise; its exp(-x^2/2) is reused by the derivative. double: libm.
constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;

struct GeluParts {
  float cdf;  // Phi(x) = (1 + erf(x / sqrt 2)) / 2
  float pdf;  // phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
};

inline __attribute__((always_inline)) GeluParts gelu_parts(float x) {
  const float a = (x < 0.0f ? -x : x) * static_cast<float>(kInvSqrt2);
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float e = fast_exp(-a * a);  // exp(-x^2 / 2)
  const float erf_a = 1.0f - p * t * e;
  const float erf_x = x < 0.0f ? -erf_a : erf_a;
  return {0.5f * (1.0f + erf_x), static_cast<float>(kInvSqrt2Pi) * e};
}

// The three kernels, one block at a time (kind: 0 dropout, 1 GELU + dropout forward, 2 its
// backward): out = keep * x, keep * GELU(x), or keep * grad * GELU'(x), keep = 0 or scale.
template <int kKind, typename T>
void run_blocks(const T* __restrict x, const T* __restrict grad, T* __restrict out, int64_t n,
                uint64_t s, int32_t thr, T scale) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const int nt = num_threads_for(n / 65536 + 1);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    alignas(64) T keep[kBlock];
    const int64_t start = b * kBlock;
    const int64_t len = std::min(kBlock, n - start);
    block_keep<T>(s, start, len, thr, scale, keep);
    const T* __restrict xb = x + start;
    T* __restrict ob = out + start;
    if constexpr (kKind == 0) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) ob[i] = xb[i] * keep[i];
    } else if constexpr (std::is_same_v<T, float>) {
      const float* __restrict gb = kKind == 2 ? grad + start : nullptr;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const GeluParts g = gelu_parts(xb[i]);
        if constexpr (kKind == 1) {
          ob[i] = xb[i] * g.cdf * keep[i];
        } else {
          ob[i] = gb[i] * keep[i] * (g.cdf + xb[i] * g.pdf);
        }
      }
    } else {  // double: libm's erf and exp, exact to rounding
      for (int64_t i = 0; i < len; ++i) {
        const double v = xb[i];
        const double cdf = 0.5 * (1.0 + std::erf(v * kInvSqrt2));
        if constexpr (kKind == 1) {
          ob[i] = v * cdf * keep[i];
        } else {
          const double pdf = kInvSqrt2Pi * std::exp(-0.5 * v * v);
          ob[i] = grad[start + i] * keep[i] * (cdf + v * pdf);
        }
      }
    }
  }
}

template <int kKind>
at::Tensor dispatch(const at::Tensor& x, const at::Tensor* grad, int64_t seed, int64_t threshold,
                    double scale) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int32_t thr = static_cast<int32_t>(threshold);
  if (x.scalar_type() == at::kDouble) {
    run_blocks<kKind, double>(x.const_data_ptr<double>(),
                              grad ? grad->const_data_ptr<double>() : nullptr,
                              out.data_ptr<double>(), x.numel(), mix_seed(seed), thr, scale);
  } else {
    run_blocks<kKind, float>(x.const_data_ptr<float>(),
                             grad ? grad->const_data_ptr<float>() : nullptr,
                             out.data_ptr<float>(), x.numel(), mix_seed(seed), thr,
                             static_cast<float>(scale));
  }
  return out;
}

// out = keep ? x * scale : 0 with the draws of `seed`: the forward, and (applied to the incoming
// gradient with the same seed) the backward of seeded dropout.
at::Tensor dropout_seeded(const at::Tensor& x, int64_t seed, int64_t threshold, double scale) {
  check_dense(x, "dropout_seeded");
  return dispatch<0>(x, nullptr, seed, threshold, scale);
}

// out = keep ? GELU(h) * scale : 0: the FFN's activation and its dropout in one pass.
at::Tensor gelu_dropout_fwd(const at::Tensor& h, int64_t seed, int64_t threshold, double scale) {
  check_dense(h, "gelu_dropout_fwd");
  return dispatch<1>(h, nullptr, seed, threshold, scale);
}

// dh = keep ? grad * scale * GELU'(h) : 0, GELU'(h) = cdf(h) + h * pdf(h).
at::Tensor gelu_dropout_bwd(const at::Tensor& grad, const at::Tensor& h, int64_t seed,
                            int64_t threshold, double scale) {
  check_dense(grad, "gelu_dropout_bwd");
  check_dense(h, "gelu_dropout_bwd");
  TORCH_CHECK(grad.sizes() == h.sizes() && grad.scalar_type() == h.scalar_type(),
              "gelu_dropout_bwd: grad and h must have the same shape and dtype");
  return dispatch<2>(h, &grad, seed, threshold, scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchrec_mamba_scan, m) {
  m.def("dropout_seeded(Tensor x, int seed, int threshold, float scale) -> Tensor");
  m.def("gelu_dropout_fwd(Tensor h, int seed, int threshold, float scale) -> Tensor");
  m.def("gelu_dropout_bwd(Tensor grad, Tensor h, int seed, int threshold, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchrec_mamba_scan, CPU, m) {
  m.impl("dropout_seeded", &dropout_seeded);
  m.impl("gelu_dropout_fwd", &gelu_dropout_fwd);
  m.impl("gelu_dropout_bwd", &gelu_dropout_bwd);
}
