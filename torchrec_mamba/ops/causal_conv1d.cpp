// Depthwise causal conv1d on CPU (Mamba's short conv, any width W), with an optional fused
// SiLU, its backward, and the one-step update for streaming inference. One (b, d) row of L
// steps at a time, rows split over threads, the loop over t vectorised:
//   y[t] = act(bias + sum_k w[k] * x[t - (W - 1) + k])          (x[< 0] = 0)
// A channels-last variant ((B, L, D) memory, the loop over channels vectorised) serves the Mamba
// block, whose projections produce that layout. The Python op is causal_conv1d.py beside this
// file.

#include "kernel_common.h"

namespace {

using namespace torchrec_mamba_cpu;

template <typename T>
inline void conv_row(const T* __restrict x, const T* __restrict w, T bias, int64_t L, int64_t W,
                     T* __restrict s) {
  // Warm-up steps t < W - 1 see the zero padding.
  const int64_t head = std::min<int64_t>(W - 1, L);
  for (int64_t t = 0; t < head; ++t) {
    T acc = bias;
    for (int64_t k = W - 1 - t; k < W; ++k) acc += w[k] * x[t - (W - 1) + k];
    s[t] = acc;
  }
  if (W == 4) {  // the Mamba default, unrolled
    const T w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
#pragma omp simd
    for (int64_t t = head; t < L; ++t)
      s[t] = bias + w0 * x[t - 3] + w1 * x[t - 2] + w2 * x[t - 1] + w3 * x[t];
  } else {
#pragma omp simd
    for (int64_t t = head; t < L; ++t) s[t] = bias;
    for (int64_t k = 0; k < W; ++k) {
      const T wk = w[k];
      const int64_t shift = W - 1 - k;
#pragma omp simd
      for (int64_t t = head; t < L; ++t) s[t] += wk * x[t - shift];
    }
  }
}

template <typename T>
void conv_fwd_kernel(const T* x, const T* w, const T* bias, bool silu, int64_t rows, int64_t Dm,
                     int64_t L, int64_t W, T* y) {
  const int nt = num_threads_for(rows / 16 + 1);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t d = r % Dm;
    T* __restrict yr = y + r * L;
    conv_row<T>(x + r * L, w + d * W, bias ? bias[d] : T(0), L, W, yr);
    if (silu) {
#pragma omp simd
      for (int64_t t = 0; t < L; ++t) yr[t] = yr[t] * sigmoid(yr[t]);
    }
  }
}

template <typename T>
void conv_bwd_kernel(const T* x, const T* w, const T* bias, bool silu, const T* dy, int64_t rows,
                     int64_t Dm, int64_t L, int64_t W, T* dx, T* dw, T* db) {
  const int nt = num_threads_for(rows / 16 + 1);
  std::vector<T> acc_w(static_cast<size_t>(nt) * Dm * W, T(0));
  std::vector<T> acc_b(static_cast<size_t>(nt) * Dm, T(0));
  std::vector<T> scratch(static_cast<size_t>(nt) * L);
#pragma omp parallel num_threads(nt)
  {
    const int tid = thread_id();
    T* __restrict g = scratch.data() + static_cast<size_t>(tid) * L;  // d loss / d pre-activation
    T* my_w = acc_w.data() + static_cast<size_t>(tid) * Dm * W;
    T* my_b = acc_b.data() + static_cast<size_t>(tid) * Dm;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t d = r % Dm;
      const T* __restrict xr = x + r * L;
      const T* __restrict dyr = dy + r * L;
      const T* __restrict wr = w + d * W;
      if (silu) {
        conv_row<T>(xr, wr, bias ? bias[d] : T(0), L, W, g);
#pragma omp simd
        for (int64_t t = 0; t < L; ++t) {
          const T s = g[t];
          const T sig = sigmoid(s);
          g[t] = dyr[t] * sig * (T(1) + s * (T(1) - sig));
        }
      } else {
        std::copy(dyr, dyr + L, g);
      }
      // dx[t] = sum_k w[k] * g[t + W - 1 - k] over t + W - 1 - k < L.
      T* __restrict dxr = dx + r * L;
      const int64_t body = std::max<int64_t>(L - (W - 1), 0);
      if (W == 4) {
        const T w0 = wr[0], w1 = wr[1], w2 = wr[2], w3 = wr[3];
#pragma omp simd
        for (int64_t t = 0; t < body; ++t)
          dxr[t] = w3 * g[t] + w2 * g[t + 1] + w1 * g[t + 2] + w0 * g[t + 3];
      } else {
        std::fill(dxr, dxr + body, T(0));
        for (int64_t k = 0; k < W; ++k) {
          const T wk = wr[k];
          const int64_t shift = W - 1 - k;
#pragma omp simd
          for (int64_t t = 0; t < body; ++t) dxr[t] += wk * g[t + shift];
        }
      }
      for (int64_t t = body; t < L; ++t) {
        T acc = T(0);
        for (int64_t k = 0; k < W; ++k) {
          const int64_t j = t + W - 1 - k;
          if (j < L) acc += wr[k] * g[j];
        }
        dxr[t] = acc;
      }
      // dw[k] = sum_t g[t] * x[t - (W - 1) + k] over t - (W - 1) + k >= 0; dbias = sum_t g[t].
      for (int64_t k = 0; k < W; ++k) {
        const int64_t shift = W - 1 - k;
        T acc = T(0);
#pragma omp simd reduction(+ : acc)
        for (int64_t t = shift; t < L; ++t) acc += g[t] * xr[t - shift];
        my_w[d * W + k] += acc;
      }
      T sb = T(0);
#pragma omp simd reduction(+ : sb)
      for (int64_t t = 0; t < L; ++t) sb += g[t];
      my_b[d] += sb;
    }
  }
  for (int i = 0; i < nt; ++i) {
    for (int64_t k = 0; k < Dm * W; ++k) dw[k] += acc_w[static_cast<size_t>(i) * Dm * W + k];
    if (db)
      for (int64_t d = 0; d < Dm; ++d) db[d] += acc_b[static_cast<size_t>(i) * Dm + d];
  }
}

void check_conv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.device().is_cpu(),
              "causal_conv1d_cpu: x must be a contiguous CPU (B, D, L) tensor, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "causal_conv1d_cpu: needs float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(1) && w.size(1) >= 1 && w.is_contiguous() &&
                  w.scalar_type() == x.scalar_type(),
              "causal_conv1d_cpu: weight must be a contiguous (D, W) tensor of x's dtype, got ",
              w.sizes());
  if (present(b)) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == x.size(1) && b->is_contiguous() &&
                    b->scalar_type() == x.scalar_type(),
                "causal_conv1d_cpu: bias must be a contiguous (D,) tensor of x's dtype");
  }
}

at::Tensor causal_conv1d_fwd(const at::Tensor& x, const at::Tensor& w,
                             const std::optional<at::Tensor>& b, bool silu) {
  check_conv(x, w, b);
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t rows = x.size(0) * x.size(1);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    conv_fwd_kernel<T>(x.const_data_ptr<T>(), w.const_data_ptr<T>(),
                       present(b) ? b->const_data_ptr<T>() : nullptr, silu, rows, x.size(1),
                       x.size(2), w.size(1), y.data_ptr<T>());
  };
  if (x.scalar_type() == at::kDouble) run(double{}); else run(float{});
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_conv1d_bwd(
    const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, bool silu,
    const at::Tensor& dy) {
  check_conv(x, w, b);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && dy.scalar_type() == x.scalar_type(),
              "causal_conv1d_cpu: dy must be contiguous and match x");
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dw = at::zeros(w.sizes(), w.options());
  at::Tensor db = at::zeros({present(b) ? x.size(1) : 0}, x.options());
  const int64_t rows = x.size(0) * x.size(1);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    conv_bwd_kernel<T>(x.const_data_ptr<T>(), w.const_data_ptr<T>(),
                       present(b) ? b->const_data_ptr<T>() : nullptr, silu, dy.const_data_ptr<T>(),
                       rows, x.size(1), x.size(2), w.size(1), dx.data_ptr<T>(), dw.data_ptr<T>(),
                       present(b) ? db.data_ptr<T>() : nullptr);
  };
  if (x.scalar_type() == at::kDouble) run(double{}); else run(float{});
  return {dx, dw, db};
}

// One step, no autograd: shift the conv state in place and apply the taps.
// Shift one row's window left by one, append x, return bias + w . window (W a compile-time
// constant where it is the usual 4, so the loops unroll into a few register moves).
template <typename T, int kW>
inline T conv_update_row(T* __restrict s, const T* __restrict wr, T x, T acc, int64_t W) {
  const int64_t w_len = kW > 0 ? kW : W;
  for (int64_t k = 0; k + 1 < w_len; ++k) s[k] = s[k + 1];
  s[w_len - 1] = x;
  for (int64_t k = 0; k < w_len; ++k) acc += wr[k] * s[k];
  return acc;
}

template <typename T>
void conv_update_kernel(const T* x, T* state, const T* w, const T* bias, bool silu, int64_t rows,
                        int64_t Dm, int64_t W, T* y) {
  const int nt = num_threads_for(rows / 65536 + 1);  // tiny work: waking a thread costs more
  // Pass 1, per row: shift the window and take the dot product (into y).
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t b = 0; b < rows / Dm; ++b) {
    for (int64_t d = 0; d < Dm; ++d) {
      const int64_t r = b * Dm + d;
      const T acc = bias ? bias[d] : T(0);
      y[r] = W == 4 ? conv_update_row<T, 4>(state + r * W, w + d * W, x[r], acc, W)
                    : conv_update_row<T, 0>(state + r * W, w + d * W, x[r], acc, W);
    }
  }
  // Pass 2: SiLU over all rows at once, so its exp vectorises (it does not inside pass 1).
  if (silu) {
#pragma omp simd
    for (int64_t r = 0; r < rows; ++r) y[r] = y[r] * sigmoid(y[r]);
  }
}

at::Tensor causal_conv1d_update_cpu(const at::Tensor& x, const at::Tensor& conv_state,
                                    const at::Tensor& w, const std::optional<at::Tensor>& b,
                                    bool silu) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "causal_conv1d_update_cpu: x must be a contiguous float (B, D) CPU tensor");
  const int64_t Bm = x.size(0), Dm = x.size(1);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == Dm && w.is_contiguous() &&
                  w.scalar_type() == x.scalar_type(),
              "causal_conv1d_update_cpu: weight must be a contiguous (D, W) tensor of x's dtype");
  const int64_t W = w.size(1);
  TORCH_CHECK(conv_state.sizes() == at::IntArrayRef({Bm, Dm, W}) && conv_state.is_contiguous() &&
                  conv_state.scalar_type() == x.scalar_type(),
              "causal_conv1d_update_cpu: conv_state must be a contiguous (B, D, W) tensor");
  if (present(b)) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == Dm && b->is_contiguous() &&
                    b->scalar_type() == x.scalar_type(),
                "causal_conv1d_update_cpu: bias must be a contiguous (D,) tensor of x's dtype");
  }
  at::Tensor y = at::empty(x.sizes(), x.options());
  auto run = [&](auto tag) {
    using T = decltype(tag);
    conv_update_kernel<T>(x.const_data_ptr<T>(), conv_state.data_ptr<T>(), w.const_data_ptr<T>(),
                          present(b) ? b->const_data_ptr<T>() : nullptr, silu, Bm * Dm, Dm, W,
                          y.data_ptr<T>());
  };
  if (x.scalar_type() == at::kDouble) run(double{}); else run(float{});
  return y;
}

// ---------------------------------------------------------------------------------------------
// Channels-last: x, y (B, L, D) contiguous (the layout of the projections' GEMM outputs), the
// loop over channels vectorised. Time steps are split over threads, in blocks of kRows; the
// backward keeps per-thread partial sums of dw and d bias.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kRows = 64;

// s[d] = bias[d] + sum_k wt[k][d] * x[t - (W - 1) + k][d] for one step t of one batch row.
template <typename T>
inline void conv_step_cl(const T* __restrict x, const T* __restrict wt, const T* __restrict bias,
                         int64_t t, int64_t Dm, int64_t W, T* __restrict s) {
  if (bias) {
    std::copy(bias, bias + Dm, s);
  } else {
    std::fill(s, s + Dm, T(0));
  }
  for (int64_t k = std::max<int64_t>(0, W - 1 - t); k < W; ++k) {
    const T* __restrict xr = x + (t - (W - 1) + k) * Dm;
    const T* __restrict wk = wt + k * Dm;
#pragma omp simd
    for (int64_t d = 0; d < Dm; ++d) s[d] += wk[d] * xr[d];
  }
}

template <typename T>
void conv_cl_fwd_kernel(const T* x, const T* wt, const T* bias, bool silu, int64_t Bm,
                        int64_t L, int64_t Dm, int64_t W, T* y) {
  const int64_t blocks = (L + kRows - 1) / kRows, items = Bm * blocks;
  const int nt = num_threads_for(items * L * Dm / 65536 + 1);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t b = item / blocks, t0 = (item % blocks) * kRows;
    const int64_t t1 = std::min(L, t0 + kRows);
    for (int64_t t = t0; t < t1; ++t) {
      T* __restrict yr = y + (b * L + t) * Dm;
      conv_step_cl<T>(x + b * L * Dm, wt, bias, t, Dm, W, yr);
      if (silu) {
#pragma omp simd
        for (int64_t d = 0; d < Dm; ++d) yr[d] = yr[d] * sigmoid(yr[d]);
      }
    }
  }
}

template <typename T>
void conv_cl_bwd_kernel(const T* x, const T* wt, const T* bias, bool silu, const T* dy,
                        int64_t Bm, int64_t L, int64_t Dm, int64_t W, T* dx, T* dwt, T* db) {
  const int64_t blocks = (L + kRows - 1) / kRows, items = Bm * blocks;
  const int nt = num_threads_for(items * L * Dm / 65536 + 1);
  std::vector<T> acc_w(static_cast<size_t>(nt) * W * Dm, T(0));
  std::vector<T> acc_b(static_cast<size_t>(nt) * Dm, T(0));
  // g = d loss / d pre-activation for the kRows steps of a block and the W - 1 after them.
  const int64_t g_rows = kRows + W - 1;
  std::vector<T> scratch(static_cast<size_t>(nt) * g_rows * Dm);
#pragma omp parallel num_threads(nt)
  {
    T* my_w = acc_w.data() + static_cast<size_t>(thread_id()) * W * Dm;
    T* my_b = acc_b.data() + static_cast<size_t>(thread_id()) * Dm;
    T* g = scratch.data() + static_cast<size_t>(thread_id()) * g_rows * Dm;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / blocks, t0 = (item % blocks) * kRows;
      const int64_t t1 = std::min(L, t0 + kRows), j1 = std::min(L, t1 + W - 1);
      const T* __restrict xb = x + b * L * Dm;
      // 1. g for steps [t0, j1), the pre-activation recomputed.
      for (int64_t j = t0; j < j1; ++j) {
        T* __restrict gr = g + (j - t0) * Dm;
        const T* __restrict dyr = dy + (b * L + j) * Dm;
        if (silu) {
          conv_step_cl<T>(xb, wt, bias, j, Dm, W, gr);
#pragma omp simd
          for (int64_t d = 0; d < Dm; ++d) {
            const T sv = gr[d], sig = sigmoid(sv);
            gr[d] = dyr[d] * sig * (T(1) + sv * (T(1) - sig));
          }
        } else {
          std::copy(dyr, dyr + Dm, gr);
        }
      }
      // 2. dx[t] = sum_k w[k] g[t + W - 1 - k]; dw[k] += g[t] x[t - (W - 1) + k]; db += g[t].
      for (int64_t t = t0; t < t1; ++t) {
        T* __restrict dxr = dx + (b * L + t) * Dm;
        std::fill(dxr, dxr + Dm, T(0));
        for (int64_t k = 0; k < W; ++k) {
          const int64_t j = t + W - 1 - k;
          if (j >= L) continue;
          const T* __restrict wk = wt + k * Dm;
          const T* __restrict gj = g + (j - t0) * Dm;
#pragma omp simd
          for (int64_t d = 0; d < Dm; ++d) dxr[d] += wk[d] * gj[d];
        }
        const T* __restrict gt = g + (t - t0) * Dm;
        for (int64_t k = std::max<int64_t>(0, W - 1 - t); k < W; ++k) {
          const T* __restrict xr = xb + (t - (W - 1) + k) * Dm;
          T* __restrict mw = my_w + k * Dm;
#pragma omp simd
          for (int64_t d = 0; d < Dm; ++d) mw[d] += gt[d] * xr[d];
        }
#pragma omp simd
        for (int64_t d = 0; d < Dm; ++d) my_b[d] += gt[d];
      }
    }
  }
  for (int i = 0; i < nt; ++i) {
    for (int64_t k = 0; k < W * Dm; ++k) dwt[k] += acc_w[static_cast<size_t>(i) * W * Dm + k];
    if (db)
      for (int64_t d = 0; d < Dm; ++d) db[d] += acc_b[static_cast<size_t>(i) * Dm + d];
  }
}

void check_conv_cl(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.device().is_cpu(),
              "causal_conv1d_cl: x must be a contiguous CPU (B, L, D) tensor, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "causal_conv1d_cl: needs float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(2) && w.size(1) >= 1 &&
                  w.scalar_type() == x.scalar_type(),
              "causal_conv1d_cl: weight must be a (D, W) tensor of x's dtype, got ", w.sizes());
  if (present(b)) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == x.size(2) && b->is_contiguous() &&
                    b->scalar_type() == x.scalar_type(),
                "causal_conv1d_cl: bias must be a contiguous (D,) tensor of x's dtype");
  }
}

// x (B, L, D) contiguous -> y (B, L, D).
at::Tensor causal_conv1d_cl_fwd(const at::Tensor& x, const at::Tensor& w,
                                const std::optional<at::Tensor>& b, bool silu) {
  check_conv_cl(x, w, b);
  at::Tensor y = at::empty(x.sizes(), x.options());
  const at::Tensor wt = w.t().contiguous();  // (W, D): one tap's weights are contiguous
  auto run = [&](auto tag) {
    using T = decltype(tag);
    conv_cl_fwd_kernel<T>(x.const_data_ptr<T>(), wt.const_data_ptr<T>(),
                          present(b) ? b->const_data_ptr<T>() : nullptr, silu, x.size(0),
                          x.size(1), x.size(2), w.size(1), y.data_ptr<T>());
  };
  if (x.scalar_type() == at::kDouble) run(double{}); else run(float{});
  return y;
}

// Returns dx (B, L, D), dweight (D, W), dbias (D,) (size 0 without a bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_conv1d_cl_bwd(
    const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, bool silu,
    const at::Tensor& dy) {
  check_conv_cl(x, w, b);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && dy.scalar_type() == x.scalar_type(),
              "causal_conv1d_cl: dy must be contiguous and match x");
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dwt = at::zeros({w.size(1), w.size(0)}, w.options());
  at::Tensor db = at::zeros({present(b) ? x.size(2) : 0}, x.options());
  const at::Tensor wt = w.t().contiguous();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    conv_cl_bwd_kernel<T>(x.const_data_ptr<T>(), wt.const_data_ptr<T>(),
                          present(b) ? b->const_data_ptr<T>() : nullptr, silu,
                          dy.const_data_ptr<T>(), x.size(0), x.size(1), x.size(2), w.size(1),
                          dx.data_ptr<T>(), dwt.data_ptr<T>(),
                          present(b) ? db.data_ptr<T>() : nullptr);
  };
  if (x.scalar_type() == at::kDouble) run(double{}); else run(float{});
  return {dx, dwt.t().contiguous(), db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchrec_mamba_scan, m) {
  m.def("causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, bool silu) -> Tensor");
  m.def(
      "causal_conv1d_bwd(Tensor x, Tensor weight, Tensor? bias, bool silu, Tensor dy) -> "
      "(Tensor, Tensor, Tensor)");
  m.def("causal_conv1d_cl_fwd(Tensor x, Tensor weight, Tensor? bias, bool silu) -> Tensor");
  m.def(
      "causal_conv1d_cl_bwd(Tensor x, Tensor weight, Tensor? bias, bool silu, Tensor dy) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "causal_conv1d_update_cpu(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, "
      "bool silu) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchrec_mamba_scan, CPU, m) {
  m.impl("causal_conv1d_fwd", &causal_conv1d_fwd);
  m.impl("causal_conv1d_bwd", &causal_conv1d_bwd);
  m.impl("causal_conv1d_cl_fwd", &causal_conv1d_cl_fwd);
  m.impl("causal_conv1d_cl_bwd", &causal_conv1d_cl_bwd);
  m.impl("causal_conv1d_update_cpu", &causal_conv1d_update_cpu);
}
