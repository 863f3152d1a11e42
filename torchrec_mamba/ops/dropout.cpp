// FastDropout's CPU kernels: the fused forward (counter-based 16-bit draws and the mask in one
// pass) and the mask apply used by the backward. The Python op is dropout.py beside this file.

#include "kernel_common.h"

namespace {

using namespace torchrec_mamba_cpu;

// out = (draw >= threshold) ? x * scale : 0, elementwise; draw is int16. Used for FastDropout's
// forward (x the input) and backward (x the incoming gradient) in one pass each.
at::Tensor dropout_apply(const at::Tensor& x, const at::Tensor& draw, int64_t threshold,
                         double scale) {
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "dropout_apply: x must be a contiguous float32/float64 CPU tensor");
  TORCH_CHECK(draw.is_contiguous() && draw.scalar_type() == at::kShort &&
                  draw.numel() == x.numel(),
              "dropout_apply: draw must be a contiguous int16 tensor with x's numel");
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  const int16_t* __restrict d = draw.const_data_ptr<int16_t>();
  const int32_t thr = static_cast<int32_t>(threshold);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* __restrict xi = x.const_data_ptr<T>();
    T* __restrict o = out.data_ptr<T>();
    const T sc = static_cast<T>(scale);
    const int nt = num_threads_for(n / 65536 + 1);
#pragma omp parallel for simd num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; ++i) o[i] = static_cast<int32_t>(d[i]) >= thr ? xi[i] * sc : T(0);
  };
  if (x.scalar_type() == at::kDouble) run(double{}); else run(float{});
  return out;
}


// FastDropout's forward in one pass: the 16-bit uniform draws come from a counter-based hash
// (splitmix64 of seed and the index of each group of four elements), so any thread count gives
// the same draws; the seed is drawn from torch's generator by the caller, so torch.manual_seed
// makes it reproducible. Returns the output and the draws (kept for the backward).
inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::tuple<at::Tensor, at::Tensor> dropout_fwd(const at::Tensor& x, int64_t seed,
                                               int64_t threshold, double scale) {
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "dropout_fwd: x must be a contiguous float32/float64 CPU tensor");
  const int64_t n = x.numel();
  const int64_t groups = (n + 3) / 4;
  at::Tensor words = at::empty({groups}, x.options().dtype(at::kLong));
  uint64_t* __restrict w = reinterpret_cast<uint64_t*>(words.data_ptr<int64_t>());
  const uint64_t s = static_cast<uint64_t>(seed) * 0xD1B54A32D192ED03ull;
  const int nt = num_threads_for(n / 65536 + 1);
#pragma omp parallel for simd num_threads(nt) schedule(static)
  for (int64_t gi = 0; gi < groups; ++gi) w[gi] = splitmix64(s + static_cast<uint64_t>(gi));
  at::Tensor draw = words.view(at::kShort).narrow(0, 0, n).view(x.sizes());
  return {dropout_apply(x, draw, threshold, scale), draw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchrec_mamba_scan, m) {
  m.def("dropout_apply(Tensor x, Tensor draw, int threshold, float scale) -> Tensor");
  m.def("dropout_fwd(Tensor x, int seed, int threshold, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(torchrec_mamba_scan, CPU, m) {
  m.impl("dropout_apply", &dropout_apply);
  m.impl("dropout_fwd", &dropout_fwd);
}
