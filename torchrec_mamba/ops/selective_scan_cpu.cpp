// Selective scan (the S6 recurrence of Mamba) on CPU: a fused forward and a hand-written backward.
//
// Shape letters: B batch, D channels, L sequence length, N state size. The Python wrapper
// (_scan_cpu.py) hands over contiguous tensors of one floating dtype (float or double):
//   u, delta, z (B, D, L); A (D, N); Bt, Ct (B, L, N) (B and C transposed so that the loop
//   over N is unit-stride); D, delta_bias (D,).
//
// For each (b, d) the forward runs the recurrence over t with the state h (N) in a small buffer:
//   dt = softplus(delta + bias);  h = exp(dt * A) * h + dt * u * B_t;  y = C_t . h + D * u;
//   y *= silu(z)
// and never stores the states. The backward recomputes the L x N states of one (b, d) into a
// thread-local scratch buffer (with the decays exp(dt_t * A), so they are computed once), then
// runs the reverse recurrence
//   g_t = C_t * dy_t + exp(dt_{t+1} * A) * g_{t+1}      (g_{L-1} starts from d last_state)
// and reads every gradient off g_t. Memory is linear in L, never O(B * D * L * N): the scratch
// is 2 x L x N per thread.
//
// Threads: the forward splits over B x D. The backward splits over B x G channel groups, so
// that dB and dC (summed over channels) are written by one thread per (group, b); dA, dD and
// d delta_bias (summed over batch) go into per-thread accumulators that are added up at the end.
// SIMD: the inner loops over N, and the per-row softplus / sigmoid loops over L, are `omp simd`
// loops. exp, exp2 and log are branch-free polynomials so that the compiler vectorises them
// (max error <= 2 ulp for exp/exp2, 4 ulp for softplus in float; 1.5 ulp for exp in double;
// inf and NaN propagate). Build with -fno-trapping-math, or GCC will not if-convert the clamps.

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
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

#ifdef _OPENMP
inline int thread_id() { return omp_get_thread_num(); }
inline bool in_parallel() { return omp_in_parallel() != 0; }
#else
inline int thread_id() { return 0; }
inline bool in_parallel() { return false; }
#endif

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

// The decay exp(dt * A) is computed as decay_exp(dt * (A * kDecayScale)): 2^x in float with A
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

template <typename T>
struct ScanArgs {
  const T* u;      // (B, D, L)
  const T* delta;  // (B, D, L)
  const T* A;      // (D, N)
  const T* Bt;     // (B, L, N)
  const T* Ct;     // (B, L, N)
  const T* D;      // (D,) or nullptr
  const T* z;      // (B, D, L) or nullptr
  const T* bias;   // (D,) or nullptr
  bool softplus;
  int64_t batch, dim, len, nstate;
};

int num_threads_for(int64_t items) {
  if (in_parallel()) return 1;  // already inside someone's parallel region: stay serial
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), items);
  return static_cast<int>(std::max<int64_t>(nt, 1));
}

template <typename T, int NC>
void scan_fwd_kernel(const ScanArgs<T>& p, T* __restrict y, T* __restrict last) {
  const int64_t L = p.len, N = NC > 0 ? NC : p.nstate, Dm = p.dim;
  const int64_t items = p.batch * Dm;
  const int nt = num_threads_for(items);
  // Per-thread scratch, allocated here: an exception must not escape an OpenMP region.
  const int64_t per_thread = 2 * N + L;
  std::vector<T> scratch(static_cast<size_t>(nt * per_thread));
#pragma omp parallel num_threads(nt)
  {
    T* __restrict h = scratch.data() + thread_id() * per_thread;  // (N,) the state
    T* __restrict A2 = h + N;                                     // (N,) A * kDecayScale
    T* __restrict dts = A2 + N;                                   // (L,) dt of one row
#pragma omp for schedule(static)
    for (int64_t bd = 0; bd < items; ++bd) {
      const int64_t b = bd / Dm, d = bd % Dm;
      const T* __restrict u = p.u + bd * L;
      const T* __restrict delta = p.delta + bd * L;
      const T* __restrict z = p.z ? p.z + bd * L : nullptr;
      const T* __restrict A = p.A + d * N;
      const T* __restrict Bt = p.Bt + b * L * N;
      const T* __restrict Ct = p.Ct + b * L * N;
      const T skip = p.D ? p.D[d] : T(0);
      const T bias = p.bias ? p.bias[d] : T(0);
      T* __restrict yrow = y + bd * L;
      for (int64_t n = 0; n < N; ++n) A2[n] = A[n] * kDecayScale<T>;
      // dt for the whole row first: the softplus vectorises over t.
      if (p.softplus) {
#pragma omp simd
        for (int64_t t = 0; t < L; ++t) dts[t] = softplus(delta[t] + bias);
      } else {
#pragma omp simd
        for (int64_t t = 0; t < L; ++t) dts[t] = delta[t] + bias;
      }
      std::fill(h, h + N, T(0));
      for (int64_t t = 0; t < L; ++t) {
        const T dt = dts[t];
        const T dtu = dt * u[t];
        const T* __restrict Bn = Bt + t * N;
        const T* __restrict Cn = Ct + t * N;
        T acc = T(0);
#pragma omp simd reduction(+ : acc)
        for (int64_t n = 0; n < N; ++n) {
          const T hn = decay_exp(dt * A2[n]) * h[n] + dtu * Bn[n];
          h[n] = hn;
          acc += Cn[n] * hn;
        }
        yrow[t] = acc;
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

template <typename T>
struct ScanGrads {
  T* du;      // (B, D, L)
  T* ddelta;  // (B, D, L)
  T* dA;      // (D, N), zeroed
  T* dBt;     // (G, B, L, N), zeroed
  T* dCt;     // (G, B, L, N), zeroed
  T* dD;      // (D,), zeroed, or nullptr
  T* dz;      // (B, D, L) or nullptr
  T* dbias;   // (D,), zeroed, or nullptr
};

template <typename T, int NC>
void scan_bwd_kernel(const ScanArgs<T>& p, const T* dy, const T* dlast, const ScanGrads<T>& q,
                     int64_t groups) {
  const int64_t L = p.len, N = NC > 0 ? NC : p.nstate, Dm = p.dim, Bm = p.batch;
  const int64_t items = Bm * groups;
  const int nt = num_threads_for(items);
  // Per-thread accumulators of the reductions over batch, and per-thread scratch: the states
  // h_t and decays exp(dt_t * A) of one (b, d), row buffers over L and state buffers over N.
  // Allocated here: an exception must not escape an OpenMP region.
  std::vector<T> acc_dA(static_cast<size_t>(nt) * Dm * N, T(0));
  std::vector<T> acc_dD(static_cast<size_t>(nt) * Dm, T(0));
  std::vector<T> acc_dbias(static_cast<size_t>(nt) * Dm, T(0));
  const int64_t per_thread = 2 * L * N + 4 * L + 5 * N;
  std::vector<T> scratch(static_cast<size_t>(nt * per_thread));
#pragma omp parallel num_threads(nt)
  {
    const int tid = thread_id();
    T* __restrict H = scratch.data() + tid * per_thread;  // (L, N) states
    T* __restrict E = H + L * N;                          // (L, N) decays
    T* __restrict dts = E + L * N;                        // (L,) dt
    T* __restrict dsp = dts + L;                          // (L,) d dt / d delta (softplus)
    T* __restrict outs = dsp + L;                         // (L,) pre-gate output (z)
    T* __restrict sigz = outs + L;                        // (L,) sigmoid(z)
    T* __restrict g = sigz + L;                           // (N,) d loss / d h_t
    T* __restrict dA_loc = g + N;                         // (N,) dA of one (b, d)
    T* __restrict A2 = dA_loc + N;                        // (N,) A * kDecayScale
    T* __restrict zeros = A2 + N;                         // (N,) h_{-1}
    T* __restrict ones = zeros + N;                       // (N,) the decay after the last step
    std::fill(zeros, zeros + N, T(0));
    std::fill(ones, ones + N, T(1));
    T* my_dA = acc_dA.data() + static_cast<size_t>(tid) * Dm * N;
    T* my_dD = acc_dD.data() + static_cast<size_t>(tid) * Dm;
    T* my_dbias = acc_dbias.data() + static_cast<size_t>(tid) * Dm;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / groups, grp = item % groups;
      const int64_t d0 = grp * Dm / groups, d1 = (grp + 1) * Dm / groups;
      const T* __restrict Bt = p.Bt + b * L * N;
      const T* __restrict Ct = p.Ct + b * L * N;
      T* __restrict dBt = q.dBt + (grp * Bm + b) * L * N;
      T* __restrict dCt = q.dCt + (grp * Bm + b) * L * N;
      for (int64_t d = d0; d < d1; ++d) {
        const int64_t bd = b * Dm + d;
        const T* __restrict u = p.u + bd * L;
        const T* __restrict delta = p.delta + bd * L;
        const T* __restrict z = p.z ? p.z + bd * L : nullptr;
        const T* __restrict A = p.A + d * N;
        const T skip = p.D ? p.D[d] : T(0);
        const T bias = p.bias ? p.bias[d] : T(0);
        const T* __restrict dyrow = dy + bd * L;
        for (int64_t n = 0; n < N; ++n) A2[n] = A[n] * kDecayScale<T>;

        // 1. Row-wise dt, d dt / d delta and sigmoid(z), vectorised over t; then recompute the
        //    states (and the pre-gate output, which the z gradient needs).
        if (p.softplus) {
#pragma omp simd
          for (int64_t t = 0; t < L; ++t) {
            const T raw = delta[t] + bias;
            dts[t] = softplus(raw);
            dsp[t] = softplus_grad(raw);
          }
        } else {
#pragma omp simd
          for (int64_t t = 0; t < L; ++t) dts[t] = delta[t] + bias;
        }
        if (z) {
#pragma omp simd
          for (int64_t t = 0; t < L; ++t) sigz[t] = sigmoid(z[t]);
        }
        for (int64_t t = 0; t < L; ++t) {
          const T dt = dts[t];
          const T dtu = dt * u[t];
          const T* __restrict hp = t > 0 ? H + (t - 1) * N : zeros;
          T* __restrict hc = H + t * N;
          T* __restrict ec = E + t * N;
          const T* __restrict Bn = Bt + t * N;
          const T* __restrict Cn = Ct + t * N;
          T acc = T(0);  // the pre-gate output, needed only with z (cheap next to the exp)
#pragma omp simd reduction(+ : acc)
          for (int64_t n = 0; n < N; ++n) {
            const T a = decay_exp(dt * A2[n]);
            ec[n] = a;
            const T hn = a * hp[n] + dtu * Bn[n];
            hc[n] = hn;
            acc += Cn[n] * hn;
          }
          if (z) outs[t] = acc + skip * u[t];
        }

        // 2. Reverse recurrence.
        if (dlast) {
          std::copy(dlast + bd * N, dlast + (bd + 1) * N, g);
        } else {
          std::fill(g, g + N, T(0));
        }
        std::fill(dA_loc, dA_loc + N, T(0));
        T dD_loc = T(0), dbias_loc = T(0);
        for (int64_t t = L - 1; t >= 0; --t) {
          T dout = dyrow[t];  // gradient of the pre-gate output
          if (z) {
            const T zt = z[t];
            const T sig = sigz[t];
            q.dz[bd * L + t] = dout * outs[t] * sig * (T(1) + zt * (T(1) - sig));
            dout *= zt * sig;
          }
          const T ut = u[t];
          dD_loc += dout * ut;
          const T dt = dts[t];
          const T dtu = dt * ut;
          const T* __restrict hp = t > 0 ? H + (t - 1) * N : zeros;
          const T* __restrict hc = H + t * N;
          const T* __restrict ec = E + t * N;
          const T* __restrict anext = t + 1 < L ? E + (t + 1) * N : ones;
          const T* __restrict Bn = Bt + t * N;
          const T* __restrict Cn = Ct + t * N;
          T* __restrict dBn = dBt + t * N;
          T* __restrict dCn = dCt + t * N;
          T sum_gB = T(0), sum_gaA = T(0);
#pragma omp simd reduction(+ : sum_gB, sum_gaA)
          for (int64_t n = 0; n < N; ++n) {
            const T gn = anext[n] * g[n] + dout * Cn[n];  // d loss / d h_t
            dCn[n] += dout * hc[n];
            dBn[n] += gn * dtu;
            const T ga = gn * hp[n] * ec[n];  // d loss / d (dt * A) through the decay
            dA_loc[n] += ga * dt;
            sum_gaA += ga * A[n];
            sum_gB += gn * Bn[n];
            g[n] = gn;
          }
          q.du[bd * L + t] = dout * skip + dt * sum_gB;
          const T ddt = p.softplus ? (sum_gaA + ut * sum_gB) * dsp[t] : sum_gaA + ut * sum_gB;
          q.ddelta[bd * L + t] = ddt;
          dbias_loc += ddt;
        }
        for (int64_t n = 0; n < N; ++n) my_dA[d * N + n] += dA_loc[n];
        my_dD[d] += dD_loc;
        my_dbias[d] += dbias_loc;
      }
    }
  }
  for (int i = 0; i < nt; ++i) {
    const T* src = acc_dA.data() + static_cast<size_t>(i) * Dm * N;
    for (int64_t k = 0; k < Dm * N; ++k) q.dA[k] += src[k];
    for (int64_t d = 0; d < Dm; ++d) {
      if (q.dD) q.dD[d] += acc_dD[static_cast<size_t>(i) * Dm + d];
      if (q.dbias) q.dbias[d] += acc_dbias[static_cast<size_t>(i) * Dm + d];
    }
  }
  // Fold the channel-group partial sums of dB and dC into group 0.
  if (groups > 1) {
    const int64_t slab = Bm * L * N;
    const int ntf = num_threads_for(slab / 4096 + 1);
#pragma omp parallel for num_threads(ntf) schedule(static)
    for (int64_t k = 0; k < slab; ++k) {
      T sb = T(0), sc = T(0);
      for (int64_t grp = 1; grp < groups; ++grp) {
        sb += q.dBt[grp * slab + k];
        sc += q.dCt[grp * slab + k];
      }
      q.dBt[k] += sb;
      q.dCt[k] += sc;
    }
  }
}

// Compile-time state sizes for the common cases (the loops over N unroll and g stays in
// registers); any other N takes the generic path.
template <typename T>
void scan_fwd(const ScanArgs<T>& p, T* y, T* last) {
  switch (p.nstate) {
    case 16: return scan_fwd_kernel<T, 16>(p, y, last);
    case 32: return scan_fwd_kernel<T, 32>(p, y, last);
    case 64: return scan_fwd_kernel<T, 64>(p, y, last);
    default: return scan_fwd_kernel<T, 0>(p, y, last);
  }
}

template <typename T>
void scan_bwd(const ScanArgs<T>& p, const T* dy, const T* dlast, const ScanGrads<T>& q,
              int64_t groups) {
  switch (p.nstate) {
    case 16: return scan_bwd_kernel<T, 16>(p, dy, dlast, q, groups);
    case 32: return scan_bwd_kernel<T, 32>(p, dy, dlast, q, groups);
    case 64: return scan_bwd_kernel<T, 64>(p, dy, dlast, q, groups);
    default: return scan_bwd_kernel<T, 0>(p, dy, dlast, q, groups);
  }
}

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                const at::Tensor& Bt, const at::Tensor& Ct, const std::optional<at::Tensor>& D,
                const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias) {
  TORCH_CHECK(u.dim() == 3, "selective_scan_cpu: u must be (B, D, L), got ", u.sizes());
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "selective_scan_cpu: needs float32 or float64 tensors, got ", u.scalar_type());
  const int64_t Bm = u.size(0), Dm = u.size(1), L = u.size(2);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == Dm, "selective_scan_cpu: A must be (D, N), got ",
              A.sizes());
  const int64_t N = A.size(1);
  auto check = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK(t.sizes() == shape, "selective_scan_cpu: ", name, " must have shape ", shape,
                ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == u.scalar_type(), "selective_scan_cpu: ", name, " has dtype ",
                t.scalar_type(), ", expected ", u.scalar_type());
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "selective_scan_cpu: ", name,
                " must be a contiguous CPU tensor");
  };
  check(u, "u", {Bm, Dm, L});
  check(delta, "delta", {Bm, Dm, L});
  check(A, "A", {Dm, N});
  check(Bt, "Bt", {Bm, L, N});
  check(Ct, "Ct", {Bm, L, N});
  if (present(D)) check(*D, "D", {Dm});
  if (present(z)) check(*z, "z", {Bm, Dm, L});
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
                     A.size(1)};
}

// Returns y (B, D, L) and the last state (B, D, N), both in u's dtype.
std::tuple<at::Tensor, at::Tensor> selective_scan_fwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& Bt,
    const at::Tensor& Ct, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus) {
  check_args(u, delta, A, Bt, Ct, D, z, delta_bias);
  at::Tensor y = at::empty(u.sizes(), u.options());
  at::Tensor last = at::empty({u.size(0), u.size(1), A.size(1)}, u.options());
  if (u.scalar_type() == at::kDouble) {
    scan_fwd<double>(make_args<double>(u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus),
                            y.data_ptr<double>(), last.data_ptr<double>());
  } else {
    scan_fwd<float>(make_args<float>(u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus),
                           y.data_ptr<float>(), last.data_ptr<float>());
  }
  return {y, last};
}

// Returns du, ddelta, dA, dBt, dCt, dD, dz, ddelta_bias; the last three are empty (size 0)
// when D, z or delta_bias is absent.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
selective_scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                   const at::Tensor& Bt, const at::Tensor& Ct, const std::optional<at::Tensor>& D,
                   const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                   bool delta_softplus, const at::Tensor& dy,
                   const std::optional<at::Tensor>& dlast) {
  check_args(u, delta, A, Bt, Ct, D, z, delta_bias);
  const int64_t Bm = u.size(0), Dm = u.size(1), L = u.size(2), N = A.size(1);
  TORCH_CHECK(dy.sizes() == u.sizes() && dy.scalar_type() == u.scalar_type() && dy.is_contiguous(),
              "selective_scan_cpu: dy must be a contiguous ", u.scalar_type(), " tensor of shape ",
              u.sizes());
  if (present(dlast)) {
    TORCH_CHECK(dlast->sizes() == at::IntArrayRef({Bm, Dm, N}) &&
                    dlast->scalar_type() == u.scalar_type() && dlast->is_contiguous(),
                "selective_scan_cpu: dlast must be a contiguous (B, D, N) tensor of u's dtype");
  }
  // Channel groups: enough work items for every thread even when the batch is small.
  const int64_t nt = std::max<int64_t>(at::get_num_threads(), 1);
  const int64_t groups =
      (Bm == 0 || Bm >= 4 * nt) ? 1 : std::clamp<int64_t>((4 * nt + Bm - 1) / Bm, 1, std::max<int64_t>(Dm, 1));
  const auto opts = u.options();
  at::Tensor du = at::empty(u.sizes(), opts);
  at::Tensor ddelta = at::empty(u.sizes(), opts);
  at::Tensor dA = at::zeros({Dm, N}, opts);
  at::Tensor dBt = at::zeros({groups, Bm, L, N}, opts);
  at::Tensor dCt = at::zeros({groups, Bm, L, N}, opts);
  at::Tensor dD = at::zeros({present(D) ? Dm : 0}, opts);
  at::Tensor dz = present(z) ? at::empty(u.sizes(), opts) : at::empty({0}, opts);
  at::Tensor dbias = at::zeros({present(delta_bias) ? Dm : 0}, opts);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    ScanGrads<T> q{du.data_ptr<T>(),
                   ddelta.data_ptr<T>(),
                   dA.data_ptr<T>(),
                   dBt.data_ptr<T>(),
                   dCt.data_ptr<T>(),
                   present(D) ? dD.data_ptr<T>() : nullptr,
                   present(z) ? dz.data_ptr<T>() : nullptr,
                   present(delta_bias) ? dbias.data_ptr<T>() : nullptr};
    scan_bwd<T>(make_args<T>(u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus),
                       dy.const_data_ptr<T>(),
                       present(dlast) ? dlast->const_data_ptr<T>() : nullptr, q, groups);
  };
  if (u.scalar_type() == at::kDouble) {
    run(double{});
  } else {
    run(float{});
  }
  return {du, ddelta, dA, dBt.select(0, 0), dCt.select(0, 0), dD, dz, dbias};
}

}  // namespace

TORCH_LIBRARY(torchrec_mamba_scan, m) {
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor Bt, Tensor Ct, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus) -> (Tensor, Tensor)");
  m.def(
      "selective_scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor Bt, Tensor Ct, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor dy, Tensor? dlast) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(torchrec_mamba_scan, CPU, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd);
  m.impl("selective_scan_bwd", &selective_scan_bwd);
}
