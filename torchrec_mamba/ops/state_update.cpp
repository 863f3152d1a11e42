// One step of the selective scan on CPU for streaming inference, no autograd: the SSM state is
// updated in place with the recurrence shared with the scan (ssm_step in kernel_common.h).
// The Python op is state_update.py beside this file.

#include "kernel_common.h"

#include <cstring>

namespace {

using namespace torchrec_mamba_cpu;

// The state rows r = (b, d), each updated with ssm_step: on entry y[r] holds dt (bias and
// softplus applied), on exit the row's output sum_n C[n] h[n].
template <typename T>
void state_rows_scalar(T* state, const T* x, const T* A, const T* Bv, const T* Cv, int64_t Dm,
                       int64_t N, int64_t rows, int nt, T* y) {
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / Dm, d = r % Dm;
    const T dtv = y[r];
    const T dtx = dtv * x[r];
    const T dts = dtv * kDecayScale<T>;
    T* __restrict h = state + r * N;
    const T* __restrict a = A + d * N;
    const T* __restrict bn = Bv + b * N;
    const T* __restrict cn = Cv + b * N;
    y[r] = ssm_step(dts, dtx, a, h, h, static_cast<T*>(nullptr), bn, cn, N);  // in place
  }
}

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
}

inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }

// The same with N a multiple of kLanes: each row is N / kLanes whole vectors (the vector decay
// of the scan forward, vexp2), one horizontal sum per row instead of a masked reduction loop:
// 892 -> ~600 us for 256 x 128 x 32 states on one Zen 4 core. What is left is the exp, one per
// state element.
void state_rows_vectorised(float* state, const float* x, const float* A, const float* Bv,
                           const float* Cv, int64_t Dm, int64_t N, int64_t rows, int nt,
                           float* y) {
  const int64_t batch = rows / Dm;
  // Batch rows outer, channels inner: no division per row, and B / C of a batch row stay hot.
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    const float* bn = Bv + b * N;
    const float* cn = Cv + b * N;
    for (int64_t d = 0; d < Dm; ++d) {
      const int64_t r = b * Dm + d;
      const float dtv = y[r];
      const vf dtx = vsplat(dtv * x[r]);
      const vf dts = vsplat(dtv * kDecayScale<float>);
      float* h = state + r * N;
      const float* a = A + d * N;
      vf acc{};
      for (int64_t n = 0; n < N; n += kLanes) {
        const vf hn = decay_exp(dts * vload(a + n)) * vload(h + n) + dtx * vload(bn + n);
        vstore(h + n, hn);
        acc += vload(cn + n) * hn;
      }
      y[r] = vsum(acc);
    }
  }
}

template <typename T>
void state_update_kernel(T* state, const T* x, const T* dt, const T* A, const T* Bv, const T* Cv,
                         const T* D, const T* z, const T* dtb, bool sp, int64_t Bm, int64_t Dm,
                         int64_t N, T* y) {
  const int64_t rows = Bm * Dm;
  // Per-row scalars first, vectorised over rows: dt (bias, softplus) into y's buffer.
#pragma omp simd
  for (int64_t r = 0; r < rows; ++r) {
    const T v = dt[r] + (dtb ? dtb[r % Dm] : T(0));
    y[r] = v;
  }
  if (sp) {
#pragma omp simd
    for (int64_t r = 0; r < rows; ++r) y[r] = softplus(y[r]);
  }
  const int nt = num_threads_for(rows * N / 16384 + 1);
  if constexpr (std::is_same_v<T, float>) {
    if (N % kLanes == 0) {  // the usual case (N = 16, 32, 64): kLanes states per vector
      state_rows_vectorised(state, x, A, Bv, Cv, Dm, N, rows, nt, y);
    } else {
      state_rows_scalar(state, x, A, Bv, Cv, Dm, N, rows, nt, y);
    }
  } else {
    state_rows_scalar(state, x, A, Bv, Cv, Dm, N, rows, nt, y);
  }
  // Skip and gate, vectorised over rows.
  if (z) {
#pragma omp simd
    for (int64_t r = 0; r < rows; ++r) {
      const T zr = z[r];
      y[r] = (y[r] + (D ? D[r % Dm] * x[r] : T(0))) * (zr * sigmoid(zr));
    }
  } else if (D) {
#pragma omp simd
    for (int64_t r = 0; r < rows; ++r) y[r] += D[r % Dm] * x[r];
  }
}

at::Tensor selective_state_update_cpu(const at::Tensor& state, const at::Tensor& x,
                                      const at::Tensor& dt, const at::Tensor& A,
                                      const at::Tensor& Bv, const at::Tensor& Cv,
                                      const std::optional<at::Tensor>& D,
                                      const std::optional<at::Tensor>& z,
                                      const std::optional<at::Tensor>& dt_bias, bool dt_softplus) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "selective_state_update_cpu: x must be a float (B, D) CPU tensor");
  const int64_t Bm = x.size(0), Dm = x.size(1), N = A.size(1);
  auto check = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK(t.sizes() == shape && t.is_contiguous() && t.scalar_type() == x.scalar_type(),
                "selective_state_update_cpu: ", name, " must be contiguous, of x's dtype, shape ",
                shape, ", got ", t.sizes());
  };
  check(x, "x", {Bm, Dm});
  check(state, "state", {Bm, Dm, N});
  check(dt, "dt", {Bm, Dm});
  check(A, "A", {Dm, N});
  check(Bv, "B", {Bm, N});
  check(Cv, "C", {Bm, N});
  if (present(D)) check(*D, "D", {Dm});
  if (present(z)) check(*z, "z", {Bm, Dm});
  if (present(dt_bias)) check(*dt_bias, "dt_bias", {Dm});
  at::Tensor y = at::empty(x.sizes(), x.options());
  auto run = [&](auto tag) {
    using T = decltype(tag);
    state_update_kernel<T>(state.data_ptr<T>(), x.const_data_ptr<T>(), dt.const_data_ptr<T>(),
                           A.const_data_ptr<T>(), Bv.const_data_ptr<T>(), Cv.const_data_ptr<T>(),
                           present(D) ? D->const_data_ptr<T>() : nullptr,
                           present(z) ? z->const_data_ptr<T>() : nullptr,
                           present(dt_bias) ? dt_bias->const_data_ptr<T>() : nullptr, dt_softplus,
                           Bm, Dm, N, y.data_ptr<T>());
  };
  if (x.scalar_type() == at::kDouble) run(double{}); else run(float{});
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchrec_mamba_scan, m) {
  m.def(
      "selective_state_update_cpu(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, "
      "Tensor C, Tensor? D, Tensor? z, Tensor? dt_bias, bool dt_softplus) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchrec_mamba_scan, CPU, m) {
  m.impl("selective_state_update_cpu", &selective_state_update_cpu);
}
