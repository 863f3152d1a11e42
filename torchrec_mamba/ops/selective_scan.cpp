// Selective scan (the S6 recurrence of Mamba) on CPU: a fused forward and a hand-written backward.
//
// Shape letters: B batch, D channels, L sequence length, N state size. The Python wrapper
// (_scan_cpu.py) hands over contiguous tensors of one floating dtype (float or double):
//   u, delta, z (B, D, L); A (D, N); Bt, Ct (B, L, N) (B and C transposed so that the N values
//   of one step are contiguous); D, delta_bias (D,).
//
// For each (b, d) the forward runs the recurrence over t (ssm_step in kernel_common.h, shared
// with the backward's recompute and the one-step state update):
//   dt = softplus(delta + bias);  h = exp(dt * A) * h + dt * u * B_t;  y = C_t . h + D * u;
//   y *= silu(z)
// It keeps no states, only a checkpoint of h every kChunk steps (when asked, for the backward):
// memory B * D * N * L / kChunk, linear in L. The backward walks the chunks from the last one:
// it recomputes the kChunk states and decays of one chunk from its checkpoint into a small,
// cache-resident buffer, then runs the reverse recurrence over the chunk
//   g_t = C_t * dout_t + exp(dt_{t+1} * A) * g_{t+1}      (g_{L-1} starts from d last_state)
// and reads every gradient (du, d delta, dA, dB, dC, dD, dz, d bias) off g_t in the same pass.
// The working set is O(kChunk * N) per thread whatever L is.
//
// float32 (the training path) is channel-vectorised: one SIMD vector holds kLanes channels of
// one batch row (16 with AVX-512, 8 otherwise), so the sum over n is a vertical FMA, with no
// horizontal reduction per step, and B_t[n], C_t[n] are broadcasts. float64 (the accuracy mode)
// keeps one channel at a time with the loop over N vectorised.
//
// Threads: the forward splits over B x channel blocks. The backward splits over B x G channel
// groups, so that dB and dC (summed over channels) are written by one thread per (group, b);
// dA, dD and d delta_bias (summed over batch) go into per-thread accumulators that are added
// up at the end.

#include "selective_scan.h"

namespace {

using namespace torchrec_mamba_cpu;

// ---------------------------------------------------------------------------------------------
// float64 (and any scalar type): one channel at a time, the loops over N vectorised.
// Checkpoints: (B, D, chunks, N).
// ---------------------------------------------------------------------------------------------

template <typename T, int NC>
void scan_fwd_kernel(const ScanArgs<T>& p, T* __restrict y, T* __restrict last, T* ckpt) {
  const int64_t L = p.len, N = NC > 0 ? NC : p.nstate, Dm = p.dim, nck = num_chunks(L);
  const int64_t items = p.batch * Dm;
  const int nt = num_threads_for(items);
  // Per-thread scratch, allocated here: an exception must not escape an OpenMP region.
  const int64_t per_thread = N + L;
  std::vector<T> scratch(static_cast<size_t>(nt * per_thread));
#pragma omp parallel num_threads(nt)
  {
    T* __restrict h = scratch.data() + thread_id() * per_thread;  // (N,) the state
    T* __restrict dts = h + N;                                    // (L,) dt of one row
#pragma omp for schedule(static)
    for (int64_t bd = 0; bd < items; ++bd) {
      const int64_t b = bd / Dm, d = bd % Dm;
      const T* __restrict u = p.u + bd * L;
      const T* __restrict z = p.z ? p.z + bd * L : nullptr;
      const T* __restrict A = p.A + d * N;
      const T* __restrict Bt = p.Bt + b * L * N;
      const T* __restrict Ct = p.Ct + b * L * N;
      const T skip = p.D ? p.D[d] : T(0);
      T* __restrict yrow = y + bd * L;
      dt_row<T>(p.delta + bd * L, p.bias ? p.bias[d] : T(0), p.softplus, L, dts, nullptr);
      std::fill(h, h + N, T(0));
      for (int64_t t = 0; t < L; ++t) {
        if (ckpt && t % kChunk == 0) std::copy(h, h + N, ckpt + (bd * nck + t / kChunk) * N);
        const T dt = dts[t];
        yrow[t] = ssm_step(dt * kDecayScale<T>, dt * u[t], A, h, h, static_cast<T*>(nullptr),
                           Bt + t * N, Ct + t * N, N);
      }
      // D skip and silu(z) gate, vectorised over t.
      if (z) {
#pragma omp simd
        for (int64_t t = 0; t < L; ++t) {
          const T zt = z[t];
          yrow[t] = (yrow[t] + skip * u[t]) * (zt * sigmoid(zt));
        }
      } else {
#pragma omp simd
        for (int64_t t = 0; t < L; ++t) yrow[t] += skip * u[t];
      }
      std::copy(h, h + N, last + bd * N);
    }
  }
}

// Per-thread buffers of the scalar backward, for one channel and one chunk.
template <typename T>
struct ScalarScratch {
  T* H;     // (kChunk, N) states
  T* E;     // (kChunk, N) decays
  T* dts;   // (kChunk,) dt
  T* dsp;   // (kChunk,) d dt / d delta
  T* outs;  // (kChunk,) pre-gate output (z)
  T* carry; // (N,) exp(dt_{t+1} A) * g_{t+1}
  T* dA;    // (N,) dA of one channel
  static int64_t size(int64_t N) { return 2 * kChunk * N + 3 * kChunk + 2 * N; }
  ScalarScratch(T* base, int64_t N)
      : H(base), E(H + kChunk * N), dts(E + kChunk * N), dsp(dts + kChunk), outs(dsp + kChunk),
        carry(outs + kChunk), dA(carry + N) {}
};

template <typename T, int NC>
void scan_bwd_kernel(const ScanArgs<T>& p, const T* ckpt, const T* dy, const T* dlast,
                     const ScanGrads<T>& q, int64_t groups) {
  const int64_t L = p.len, N = NC > 0 ? NC : p.nstate, Dm = p.dim, Bm = p.batch;
  const int64_t nck = num_chunks(L), items = Bm * groups;
  const int nt = num_threads_for(items);
  std::vector<T> acc_dA(static_cast<size_t>(nt) * Dm * N, T(0));
  std::vector<T> acc_dD(static_cast<size_t>(nt) * Dm, T(0));
  std::vector<T> acc_dbias(static_cast<size_t>(nt) * Dm, T(0));
  const int64_t per_thread = ScalarScratch<T>::size(N);
  std::vector<T> scratch(static_cast<size_t>(nt * per_thread));
#pragma omp parallel num_threads(nt)
  {
    const int tid = thread_id();
    ScalarScratch<T> s(scratch.data() + tid * per_thread, N);
    T* my_dA = acc_dA.data() + static_cast<size_t>(tid) * Dm * N;
    T* my_dD = acc_dD.data() + static_cast<size_t>(tid) * Dm;
    T* my_dbias = acc_dbias.data() + static_cast<size_t>(tid) * Dm;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / groups, grp = item % groups;
      const int64_t d0 = grp * Dm / groups, d1 = (grp + 1) * Dm / groups;
      T* __restrict dBt = q.dBt + (grp * Bm + b) * L * N;
      T* __restrict dCt = q.dCt + (grp * Bm + b) * L * N;
      for (int64_t d = d0; d < d1; ++d) {
        const int64_t bd = b * Dm + d;
        const T* __restrict A = p.A + d * N;
        const T skip = p.D ? p.D[d] : T(0);
        const T bias = p.bias ? p.bias[d] : T(0);
        if (dlast) {
          std::copy(dlast + bd * N, dlast + (bd + 1) * N, s.carry);
        } else {
          std::fill(s.carry, s.carry + N, T(0));
        }
        std::fill(s.dA, s.dA + N, T(0));
        T dD_loc = T(0), dbias_loc = T(0);
        for (int64_t c = nck - 1; c >= 0; --c) {
          const int64_t t0 = c * kChunk, n_t = std::min(kChunk, L - t0);
          const T* __restrict u = p.u + bd * L + t0;
          const T* __restrict z = p.z ? p.z + bd * L + t0 : nullptr;
          const T* __restrict dyrow = dy + bd * L + t0;
          const T* __restrict Bt = p.Bt + (b * L + t0) * N;
          const T* __restrict Ct = p.Ct + (b * L + t0) * N;
          dt_row<T>(p.delta + bd * L + t0, bias, p.softplus, n_t, s.dts, s.dsp);
          // 1. Recompute the chunk's states and decays from its checkpoint.
          const T* h0 = ckpt + (bd * nck + c) * N;
          for (int64_t i = 0; i < n_t; ++i) {
            const T dt = s.dts[i];
            const T acc = ssm_step<false, true>(dt * kDecayScale<T>, dt * u[i], A,
                                                i > 0 ? s.H + (i - 1) * N : h0, s.H + i * N,
                                                s.E + i * N, Bt + i * N, Ct + i * N, N);
            if (z) s.outs[i] = acc + skip * u[i];
          }
          // 2. Reverse recurrence over the chunk; carry = exp(dt_{t+1} A) * g_{t+1}.
          for (int64_t i = n_t - 1; i >= 0; --i) {
            const int64_t t = t0 + i;
            T dout = dyrow[i];  // gradient of the pre-gate output
            if (z) {
              const T zt = z[i], sig = sigmoid(zt);
              q.dz[bd * L + t] = dout * s.outs[i] * sig * (T(1) + zt * (T(1) - sig));
              dout *= zt * sig;
            }
            const T ut = u[i], dt = s.dts[i], dtu = dt * ut;
            dD_loc += dout * ut;
            const T* __restrict hp = i > 0 ? s.H + (i - 1) * N : h0;
            const T* __restrict hc = s.H + i * N;
            const T* __restrict ec = s.E + i * N;
            const T* __restrict Bn = Bt + i * N;
            const T* __restrict Cn = Ct + i * N;
            T* __restrict dBn = dBt + t * N;
            T* __restrict dCn = dCt + t * N;
            T* __restrict carry = s.carry;
            T* __restrict dA_loc = s.dA;
            T sum_gB = T(0), sum_gaA = T(0);
#pragma omp simd reduction(+ : sum_gB, sum_gaA)
            for (int64_t n = 0; n < N; ++n) {
              const T gn = carry[n] + dout * Cn[n];  // d loss / d h_t
              const T ag = gn * ec[n];
              dCn[n] += dout * hc[n];
              dBn[n] += gn * dtu;
              const T ga = ag * hp[n];  // d loss / d (dt * A) through the decay
              dA_loc[n] += ga * dt;
              sum_gaA += ga * A[n];
              sum_gB += gn * Bn[n];
              carry[n] = ag;
            }
            q.du[bd * L + t] = dout * skip + dt * sum_gB;
            const T ddt = (sum_gaA + ut * sum_gB) * (p.softplus ? s.dsp[i] : T(1));
            q.ddelta[bd * L + t] = ddt;
            dbias_loc += ddt;
          }
        }
        for (int64_t n = 0; n < N; ++n) my_dA[d * N + n] += s.dA[n];
        my_dD[d] += dD_loc;
        my_dbias[d] += dbias_loc;
      }
    }
  }
  reduce_partials(q, acc_dA, acc_dD, acc_dbias, nt, Dm, N, Bm * L * N, groups);
}

// Compile-time state sizes for the common cases (the loops over N unroll); any other N takes
// the generic path.
template <typename T>
void scan_fwd(const ScanArgs<T>& p, T* y, T* last, T* ckpt) {
  switch (p.nstate) {
    case 16: return scan_fwd_kernel<T, 16>(p, y, last, ckpt);
    case 32: return scan_fwd_kernel<T, 32>(p, y, last, ckpt);
    case 64: return scan_fwd_kernel<T, 64>(p, y, last, ckpt);
    default: return scan_fwd_kernel<T, 0>(p, y, last, ckpt);
  }
}

template <typename T>
void scan_bwd(const ScanArgs<T>& p, const T* ckpt, const T* dy, const T* dlast,
              const ScanGrads<T>& q, int64_t groups) {
  switch (p.nstate) {
    case 16: return scan_bwd_kernel<T, 16>(p, ckpt, dy, dlast, q, groups);
    case 32: return scan_bwd_kernel<T, 32>(p, ckpt, dy, dlast, q, groups);
    case 64: return scan_bwd_kernel<T, 64>(p, ckpt, dy, dlast, q, groups);
    default: return scan_bwd_kernel<T, 0>(p, ckpt, dy, dlast, q, groups);
  }
}

// rank > 0: delta is the (B, rank, L) low-rank time step (float32 only).
void check_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                const at::Tensor& Bt, const at::Tensor& Ct, const std::optional<at::Tensor>& D,
                const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                int64_t rank = 0) {
  TORCH_CHECK(u.dim() == 3, "selective_scan_cpu: u must be (B, D, L), got ", u.sizes());
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "selective_scan_cpu: needs float32 or float64 tensors, got ", u.scalar_type());
  const int64_t Bm = u.size(0), Dm = u.size(1), L = u.size(2);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == Dm, "selective_scan_cpu: A must be (D, N), got ",
              A.sizes());
  const int64_t N = A.size(1);
  // float reads the (B, D, L) activations in any layout; double and the weights: contiguous.
  const bool any_layout = u.scalar_type() == at::kFloat;
  auto check = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape,
                   bool activation = false) {
    TORCH_CHECK(t.sizes() == shape, "selective_scan_cpu: ", name, " must have shape ", shape,
                ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == u.scalar_type(), "selective_scan_cpu: ", name, " has dtype ",
                t.scalar_type(), ", expected ", u.scalar_type());
    TORCH_CHECK(t.device().is_cpu(), "selective_scan_cpu: ", name, " must be a CPU tensor");
    TORCH_CHECK(t.is_contiguous() || (activation && any_layout), "selective_scan_cpu: ", name,
                " must be contiguous");
  };
  check(u, "u", {Bm, Dm, L}, true);
  check(delta, rank > 0 ? "dt_low" : "delta", {Bm, rank > 0 ? rank : Dm, L}, true);
  check(A, "A", {Dm, N});
  check(Bt, "Bt", {Bm, L, N});
  check(Ct, "Ct", {Bm, L, N});
  if (present(D)) check(*D, "D", {Dm});
  if (present(z)) check(*z, "z", {Bm, Dm, L}, true);
  if (present(delta_bias)) check(*delta_bias, "delta_bias", {Dm});
}

template <typename T>
ScanArgs<T> make_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                      const at::Tensor& Bt, const at::Tensor& Ct,
                      const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                      const std::optional<at::Tensor>& delta_bias, bool delta_softplus) {
  return ScanArgs<T>{u.const_data_ptr<T>(),
                     delta.const_data_ptr<T>(),
                     A.const_data_ptr<T>(),
                     Bt.const_data_ptr<T>(),
                     Ct.const_data_ptr<T>(),
                     present(D) ? D->const_data_ptr<T>() : nullptr,
                     present(z) ? z->const_data_ptr<T>() : nullptr,
                     present(delta_bias) ? delta_bias->const_data_ptr<T>() : nullptr,
                     delta_softplus,
                     u.size(0),
                     u.size(1),
                     u.size(2),
                     A.size(1),
                     strides_of(u),
                     strides_of(delta),
                     present(z) ? strides_of(*z) : Strides{0, 0, 0}};
}


// An uninitialised (B, D, L) tensor in the memory layout of t: channels-last (B, L, D) memory
// when t is a channels-last view, else contiguous.
at::Tensor empty_like_layout(const at::Tensor& t) {
  if (t.size(1) > 1 && t.stride(1) == 1 && t.size(2) > 1)
    return at::empty({t.size(0), t.size(2), t.size(1)}, t.options()).transpose(1, 2);
  return at::empty(t.sizes(), t.options());
}

// Elements of the checkpoint tensor: (B, D, chunks, N) for double; (B, blocks, chunks, N, kLanes)
// for float.
int64_t checkpoint_numel(const at::Tensor& u, int64_t N) {
  const int64_t Bm = u.size(0), Dm = u.size(1), nck = num_chunks(u.size(2));
  if (u.scalar_type() == at::kDouble) return Bm * Dm * nck * N;
  return Bm * num_blocks(Dm) * nck * N * kLanes;
}

// dt_proj fused in (float32 only): with dt_w (D, R), delta is the (B, R, L) input of dt_proj in
// any layout and the time step is dt_w @ delta, formed per tile by the kernels, so the (B, D, L)
// time step and its gradient never exist in memory. Returns R (0 without dt_w).
int64_t check_proj(const at::Tensor& u, const std::optional<at::Tensor>& dt_w) {
  if (!present(dt_w)) return 0;
  TORCH_CHECK(u.scalar_type() == at::kFloat,
              "selective_scan_proj_cpu: needs float32 tensors, got ", u.scalar_type());
  TORCH_CHECK(dt_w->dim() == 2 && dt_w->size(0) == u.size(1) && dt_w->size(1) >= 1 &&
                  dt_w->is_contiguous() && dt_w->scalar_type() == at::kFloat &&
                  dt_w->device().is_cpu(),
              "selective_scan_proj_cpu: dt_w must be a contiguous float32 (D, R) CPU tensor, got ",
              dt_w->sizes());
  return dt_w->size(1);
}

template <typename T>
ScanArgs<T> make_args_proj(const at::Tensor& u, const at::Tensor& delta,
                           const std::optional<at::Tensor>& dt_w, const at::Tensor& A,
                           const at::Tensor& Bt, const at::Tensor& Ct,
                           const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                           const std::optional<at::Tensor>& delta_bias, bool delta_softplus) {
  ScanArgs<T> args = make_args<T>(u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus);
  if (present(dt_w)) {
    args.dt_w = dt_w->const_data_ptr<T>();
    args.rank = dt_w->size(1);
  }
  return args;
}

// Returns y (B, D, L), the last state (B, D, N), both in u's dtype, and the state checkpoints
// for the backward (empty unless save_checkpoints).
std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_fwd_impl(
    const at::Tensor& u, const at::Tensor& delta, const std::optional<at::Tensor>& dt_w,
    const at::Tensor& A, const at::Tensor& Bt, const at::Tensor& Ct,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus, bool save_checkpoints) {
  check_args(u, delta, A, Bt, Ct, D, z, delta_bias, check_proj(u, dt_w));
  at::Tensor y = empty_like_layout(u);
  at::Tensor last = at::empty({u.size(0), u.size(1), A.size(1)}, u.options());
  at::Tensor ckpt = at::empty({save_checkpoints ? checkpoint_numel(u, A.size(1)) : 0}, u.options());
  if (u.scalar_type() == at::kDouble) {
    scan_fwd<double>(make_args<double>(u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus),
                     y.data_ptr<double>(), last.data_ptr<double>(),
                     save_checkpoints ? ckpt.data_ptr<double>() : nullptr);
  } else {
    scan_fwd_f32(make_args_proj<float>(u, delta, dt_w, A, Bt, Ct, D, z, delta_bias, delta_softplus),
                 y.data_ptr<float>(), strides_of(y), last.data_ptr<float>(),
                 save_checkpoints ? reinterpret_cast<vf*>(ckpt.data_ptr<float>()) : nullptr);
  }
  return {y, last, ckpt};
}

using BwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Returns du, ddelta, d dt_w, dA, dBt, dCt, dD, dz, ddelta_bias. d dt_w, dD, dz and d bias are
// empty (size 0) when dt_w, D, z or delta_bias is absent; with dt_w, ddelta is the gradient of
// the (B, R, L) input, in channels-last memory. checkpoints: from the forward with
// save_checkpoints=True.
BwdResult scan_bwd_impl(const at::Tensor& u, const at::Tensor& delta,
                        const std::optional<at::Tensor>& dt_w, const at::Tensor& A,
                        const at::Tensor& Bt, const at::Tensor& Ct,
                        const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                        const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                        const at::Tensor& checkpoints, const at::Tensor& dy,
                        const std::optional<at::Tensor>& dlast) {
  const int64_t R = check_proj(u, dt_w);
  check_args(u, delta, A, Bt, Ct, D, z, delta_bias, R);
  const int64_t Bm = u.size(0), Dm = u.size(1), L = u.size(2), N = A.size(1);
  TORCH_CHECK(dy.sizes() == u.sizes() && dy.scalar_type() == u.scalar_type() &&
                  (dy.is_contiguous() || u.scalar_type() == at::kFloat),
              "selective_scan_cpu: dy must be a ", u.scalar_type(), " tensor of shape ", u.sizes(),
              " (contiguous for float64)");
  TORCH_CHECK(checkpoints.numel() == checkpoint_numel(u, N) && checkpoints.is_contiguous() &&
                  checkpoints.scalar_type() == u.scalar_type(),
              "selective_scan_cpu: checkpoints must come from selective_scan_fwd with "
              "save_checkpoints=True (", checkpoint_numel(u, N), " elements), got ",
              checkpoints.numel());
  if (present(dlast)) {
    TORCH_CHECK(dlast->sizes() == at::IntArrayRef({Bm, Dm, N}) &&
                    dlast->scalar_type() == u.scalar_type() && dlast->is_contiguous(),
                "selective_scan_cpu: dlast must be a contiguous (B, D, N) tensor of u's dtype");
  }
  // Channel groups: enough work items for every thread even when the batch is small.
  const int64_t nt = std::max<int64_t>(at::get_num_threads(), 1);
  // float splits channels in blocks of kLanes, double one channel at a time.
  const int64_t units = u.scalar_type() == at::kDouble ? Dm : num_blocks(Dm);
  const int64_t groups = (Bm == 0 || Bm >= 4 * nt)
                             ? 1
                             : std::clamp<int64_t>((4 * nt + Bm - 1) / Bm, 1,
                                                   std::max<int64_t>(units, 1));
  const auto opts = u.options();
  at::Tensor du = empty_like_layout(u);
  // With dt_w: the low-rank gradient's per-group lane sums (B, L, R) each, folded into group 0.
  at::Tensor ddelta = R ? at::zeros({groups, Bm, L, R}, opts) : empty_like_layout(delta);
  at::Tensor ddt_w = at::zeros({R ? Dm : 0, R}, opts);
  at::Tensor dA = at::zeros({Dm, N}, opts);
  at::Tensor dBt = at::zeros({groups, Bm, L, N}, opts);
  at::Tensor dCt = at::zeros({groups, Bm, L, N}, opts);
  at::Tensor dD = at::zeros({present(D) ? Dm : 0}, opts);
  at::Tensor dz = present(z) ? empty_like_layout(*z) : at::empty({0}, opts);
  at::Tensor dbias = at::zeros({present(delta_bias) ? Dm : 0}, opts);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    ScanGrads<T> q{du.data_ptr<T>(),
                   R ? nullptr : ddelta.data_ptr<T>(),
                   dA.data_ptr<T>(),
                   dBt.data_ptr<T>(),
                   dCt.data_ptr<T>(),
                   present(D) ? dD.data_ptr<T>() : nullptr,
                   present(z) ? dz.data_ptr<T>() : nullptr,
                   present(delta_bias) ? dbias.data_ptr<T>() : nullptr};
    const T* dlast_ptr = present(dlast) ? dlast->const_data_ptr<T>() : nullptr;
    const T* ck = checkpoints.const_data_ptr<T>();
    if constexpr (std::is_same_v<T, float>) {
      if (R) {
        q.ddt_low = ddelta.data_ptr<float>();
        q.ddt_w = ddt_w.data_ptr<float>();
      }
      const GradStrides gs{strides_of(dy), strides_of(du),
                           R ? Strides{0, 0, 0} : strides_of(ddelta),
                           present(z) ? strides_of(dz) : Strides{0, 0, 0}};
      scan_bwd_f32(make_args_proj<float>(u, delta, dt_w, A, Bt, Ct, D, z, delta_bias,
                                         delta_softplus),
                   reinterpret_cast<const vf*>(ck), dy.const_data_ptr<T>(), dlast_ptr, q, gs,
                   groups);
    } else {
      scan_bwd<T>(make_args<T>(u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus), ck,
                  dy.const_data_ptr<T>(), dlast_ptr, q, groups);
    }
  };
  if (u.scalar_type() == at::kDouble) {
    run(double{});
  } else {
    run(float{});
  }
  // With dt_w: (B, L, R) memory seen as (B, R, L), like the channels-last input the block passes.
  if (R) ddelta = ddelta.select(0, 0).transpose(1, 2);
  return {du, ddelta, ddt_w, dA, dBt.select(0, 0), dCt.select(0, 0), dD, dz, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_fwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& Bt,
    const at::Tensor& Ct, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus, bool save_checkpoints) {
  return scan_fwd_impl(u, delta, std::nullopt, A, Bt, Ct, D, z, delta_bias, delta_softplus,
                       save_checkpoints);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_proj_fwd(
    const at::Tensor& u, const at::Tensor& dt_low, const at::Tensor& dt_w, const at::Tensor& A,
    const at::Tensor& Bt, const at::Tensor& Ct, const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
    bool delta_softplus, bool save_checkpoints) {
  return scan_fwd_impl(u, dt_low, dt_w, A, Bt, Ct, D, z, delta_bias, delta_softplus,
                       save_checkpoints);
}

// du, ddelta, dA, dBt, dCt, dD, dz, ddelta_bias (scan_bwd_impl without d dt_w).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
selective_scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                   const at::Tensor& Bt, const at::Tensor& Ct, const std::optional<at::Tensor>& D,
                   const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                   bool delta_softplus, const at::Tensor& checkpoints, const at::Tensor& dy,
                   const std::optional<at::Tensor>& dlast) {
  auto [du, ddelta, ddt_w, dA, dBt, dCt, dD, dz, dbias] = scan_bwd_impl(
      u, delta, std::nullopt, A, Bt, Ct, D, z, delta_bias, delta_softplus, checkpoints, dy, dlast);
  return {du, ddelta, dA, dBt, dCt, dD, dz, dbias};
}

// du, d dt_low (B, R, L), d dt_w (D, R), dA, dBt, dCt, dD, dz, ddelta_bias.
BwdResult selective_scan_proj_bwd(const at::Tensor& u, const at::Tensor& dt_low,
                                  const at::Tensor& dt_w, const at::Tensor& A,
                                  const at::Tensor& Bt, const at::Tensor& Ct,
                                  const std::optional<at::Tensor>& D,
                                  const std::optional<at::Tensor>& z,
                                  const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                                  const at::Tensor& checkpoints, const at::Tensor& dy,
                                  const std::optional<at::Tensor>& dlast) {
  return scan_bwd_impl(u, dt_low, dt_w, A, Bt, Ct, D, z, delta_bias, delta_softplus, checkpoints,
                       dy, dlast);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchrec_mamba_scan, m) {
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor Bt, Tensor Ct, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus, bool save_checkpoints) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "selective_scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor Bt, Tensor Ct, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor checkpoints, Tensor dy, "
      "Tensor? dlast) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "selective_scan_proj_fwd(Tensor u, Tensor dt_low, Tensor dt_w, Tensor A, Tensor Bt, "
      "Tensor Ct, Tensor? D, Tensor? z, Tensor? delta_bias, bool delta_softplus, "
      "bool save_checkpoints) -> (Tensor, Tensor, Tensor)");
  m.def(
      "selective_scan_proj_bwd(Tensor u, Tensor dt_low, Tensor dt_w, Tensor A, Tensor Bt, "
      "Tensor Ct, Tensor? D, Tensor? z, Tensor? delta_bias, bool delta_softplus, "
      "Tensor checkpoints, Tensor dy, Tensor? dlast) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(torchrec_mamba_scan, CPU, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd);
  m.impl("selective_scan_bwd", &selective_scan_bwd);
  m.impl("selective_scan_proj_fwd", &selective_scan_proj_fwd);
  m.impl("selective_scan_proj_bwd", &selective_scan_proj_bwd);
}
