// Selective scan (the S6 recurrence of Mamba) on CPU: a fused forward and a hand-written backward.
//
// Shape letters: B batch, D channels, L sequence length, N state size. The Python wrapper
// (_scan_cpu.py) hands over contiguous tensors of one floating dtype (float or double):
//   u, delta, z (B, D, L); A (D, N); Bt, Ct (B, L, N) (B and C transposed so that the N values
//   of one step are contiguous); D, delta_bias (D,).
//
// For each (b, d) the forward runs the recurrence over t with the state h (N) in a small buffer:
//   dt = softplus(delta + bias);  h = exp(dt * A) * h + dt * u * B_t;  y = C_t . h + D * u;
//   y *= silu(z)
// and never stores the states. The backward recomputes the states of a (b, channel block) into
// a thread-local scratch buffer (with the decays exp(dt_t * A), so they are computed once), then
// runs the reverse recurrence
//   g_t = C_t * dy_t + exp(dt_{t+1} * A) * g_{t+1}      (g_{L-1} starts from d last_state)
// and reads every gradient off g_t. Memory is linear in L, never O(B * D * L * N).
//
// float32 (the training path) is channel-vectorised: one SIMD vector holds kLanes channels of
// one batch row (16 with AVX-512, 8 otherwise), so the sum over n is a vertical FMA, with no
// horizontal reduction per step, and B_t[n], C_t[n] are broadcasts. See scan_fwd_f32.
// float64 (the accuracy mode) keeps one channel at a time with the loop over N vectorised.
//
// Threads: the forward splits over B x channel blocks. The backward splits over B x G channel
// groups, so that dB and dC (summed over channels) are written by one thread per (group, b);
// dA, dD and d delta_bias (summed over batch) go into per-thread accumulators that are added
// up at the end. exp, exp2 and log are branch-free polynomials so that the compiler vectorises
// them (max error <= 2 ulp for exp/exp2, 4 ulp for softplus in float; 1.5 ulp for exp in double;
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
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
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
// then scale by 2^k. Max error 1.7 ulp; NaN propagates; x <= -150 gives 0, x >= 129 gives inf.
inline vf vexp2(vf x) {
#if defined(__AVX512F__)
  __m512 xm = _mm512_min_ps(_mm512_set1_ps(129.0f), (__m512)x);  // (c, x): NaN in x propagates
  xm = _mm512_max_ps(_mm512_set1_ps(-151.0f), xm);
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

// Rows [d0, d0 + nc) of a (.., L) tensor slab -> an (L, kLanes) tile, zero-padded.
inline void load_tile(const float* __restrict rows, int64_t L, int nc, vf* __restrict tile) {
  if (nc < kLanes) std::fill(tile, tile + L, vf{});
  float* __restrict t = reinterpret_cast<float*>(tile);
  for (int c = 0; c < nc; ++c) {
    const float* __restrict r = rows + c * L;
    for (int64_t i = 0; i < L; ++i) t[i * kLanes + c] = r[i];
  }
}

inline void store_tile(const vf* __restrict tile, int64_t L, int nc, float* __restrict rows) {
  const float* __restrict t = reinterpret_cast<const float*>(tile);
  for (int c = 0; c < nc; ++c) {
    float* __restrict r = rows + c * L;
    for (int64_t i = 0; i < L; ++i) r[i] = t[i * kLanes + c];
  }
}

inline vf lane_vector(const float* __restrict src, int nc, int64_t stride, float pad) {
  vf v = vsplat(pad);
  for (int c = 0; c < nc; ++c) v[c] = src[c * stride];
  return v;
}

// dt tile in place: dt = softplus(delta + bias), or delta + bias; optionally its derivative.
inline void dt_tile(vf* __restrict dtv, vf* __restrict dspv, int64_t L, vf bias, bool sp) {
  float* __restrict f = reinterpret_cast<float*>(dtv);
  float* __restrict g = reinterpret_cast<float*>(dspv);
  const float* bb = reinterpret_cast<const float*>(&bias);
  for (int64_t t = 0; t < L; ++t) {
    float* __restrict ft = f + t * kLanes;
    if (sp) {
      if (g) {
        float* __restrict gt = g + t * kLanes;
#pragma omp simd
        for (int c = 0; c < kLanes; ++c) {
          const float raw = ft[c] + bb[c];
          ft[c] = softplus(raw);
          gt[c] = raw > 20.0f ? 1.0f : 1.0f / (1.0f + fast_exp(-raw));
        }
      } else {
#pragma omp simd
        for (int c = 0; c < kLanes; ++c) ft[c] = softplus(ft[c] + bb[c]);
      }
    } else {
#pragma omp simd
      for (int c = 0; c < kLanes; ++c) ft[c] = ft[c] + bb[c];
    }
  }
}

inline vf vsigmoid(vf x) {
  vf s;
  const float* xs = reinterpret_cast<const float*>(&x);
  float* ss = reinterpret_cast<float*>(&s);
#pragma omp simd
  for (int c = 0; c < kLanes; ++c) ss[c] = 1.0f / (1.0f + fast_exp(-xs[c]));
  return s;
}

struct Blocks {
  int64_t count;
  explicit Blocks(int64_t dim) : count((dim + kLanes - 1) / kLanes) {}
};

void scan_fwd_f32(const ScanArgs<float>& p, float* __restrict y, float* __restrict last) {
  const int64_t L = p.len, N = p.nstate, Dm = p.dim;
  const int64_t nblk = Blocks(Dm).count;
  const int64_t items = p.batch * nblk;
  const int nt = num_threads_for(items);
  const int64_t per_thread = 3 * L + 2 * N;  // in vectors
  std::vector<vf> scratch(static_cast<size_t>(nt * per_thread));
#pragma omp parallel num_threads(nt)
  {
    vf* __restrict dtv = scratch.data() + thread_id() * per_thread;  // (L,) dt
    vf* __restrict uv = dtv + L;                                      // (L,) u
    vf* __restrict accv = uv + L;                                     // (L,) C . h
    vf* __restrict h = accv + L;                                      // (N,) state
    vf* __restrict A2 = h + N;                                        // (N,) A * log2(e)
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / nblk, d0 = (item % nblk) * kLanes;
      const int nc = static_cast<int>(std::min<int64_t>(kLanes, Dm - d0));
      const int64_t row0 = (b * Dm + d0) * L;
      load_tile(p.u + row0, L, nc, uv);
      load_tile(p.delta + row0, L, nc, dtv);
      const vf bias = p.bias ? lane_vector(p.bias + d0, nc, 1, 0.0f) : vf{};
      dt_tile(dtv, nullptr, L, bias, p.softplus);
      for (int64_t n = 0; n < N; ++n)
        A2[n] = lane_vector(p.A + d0 * N + n, nc, N, 0.0f) * kDecayScale<float>;
      std::fill(h, h + N, vf{});
      const float* __restrict Bt = p.Bt + b * L * N;
      const float* __restrict Ct = p.Ct + b * L * N;
      for (int64_t t = 0; t < L; ++t) {
        const vf dt = dtv[t];
        const vf dtu = dt * uv[t];
        const float* __restrict Bn = Bt + t * N;
        const float* __restrict Cn = Ct + t * N;
        vf acc0{}, acc1{};
        int64_t n = 0;
        for (; n + 1 < N; n += 2) {
          const vf h0 = vexp2(dt * A2[n]) * h[n] + dtu * Bn[n];
          const vf h1 = vexp2(dt * A2[n + 1]) * h[n + 1] + dtu * Bn[n + 1];
          h[n] = h0;
          h[n + 1] = h1;
          acc0 += h0 * Cn[n];
          acc1 += h1 * Cn[n + 1];
        }
        if (n < N) {
          const vf h0 = vexp2(dt * A2[n]) * h[n] + dtu * Bn[n];
          h[n] = h0;
          acc0 += h0 * Cn[n];
        }
        accv[t] = acc0 + acc1;
      }
      // D skip and silu(z) gate, row by row (vectorised over t).
      const float* accf = reinterpret_cast<const float*>(accv);
      for (int c = 0; c < nc; ++c) {
        const int64_t bd = b * Dm + d0 + c;
        const float skip = p.D ? p.D[d0 + c] : 0.0f;
        const float* __restrict u = p.u + bd * L;
        const float* __restrict z = p.z ? p.z + bd * L : nullptr;
        float* __restrict yrow = y + bd * L;
        if (z) {
#pragma omp simd
          for (int64_t t = 0; t < L; ++t) {
            const float zt = z[t];
            yrow[t] = (accf[t * kLanes + c] + skip * u[t]) * (zt * sigmoid(zt));
          }
        } else {
#pragma omp simd
          for (int64_t t = 0; t < L; ++t) yrow[t] = accf[t * kLanes + c] + skip * u[t];
        }
        for (int64_t n = 0; n < N; ++n) last[bd * N + n] = h[n][c];
      }
    }
  }
}

void scan_bwd_f32(const ScanArgs<float>& p, const float* dy, const float* dlast,
                  const ScanGrads<float>& q, int64_t groups) {
  const int64_t L = p.len, N = p.nstate, Dm = p.dim, Bm = p.batch;
  const int64_t nblk = Blocks(Dm).count;
  const int64_t items = Bm * groups;
  const int nt = num_threads_for(items);
  std::vector<float> acc_dA(static_cast<size_t>(nt) * Dm * N, 0.0f);
  std::vector<float> acc_dD(static_cast<size_t>(nt) * Dm, 0.0f);
  std::vector<float> acc_dbias(static_cast<size_t>(nt) * Dm, 0.0f);
  // Per thread, in vectors: states H and decays E (L, N), the channel-lane partial sums of dB
  // and dC (L, N), ten (L,) tiles, and five (N,) buffers.
  const int64_t per_thread = 4 * L * N + 10 * L + 5 * N;
  std::vector<vf> scratch(static_cast<size_t>(nt * per_thread));
#pragma omp parallel num_threads(nt)
  {
    const int tid = thread_id();
    vf* __restrict H = scratch.data() + tid * per_thread;
    vf* __restrict E = H + L * N;
    vf* __restrict dBv = E + L * N;
    vf* __restrict dCv = dBv + L * N;
    vf* __restrict dtv = dCv + L * N;
    vf* __restrict dspv = dtv + L;
    vf* __restrict uv = dspv + L;
    vf* __restrict zv = uv + L;
    vf* __restrict sigv = zv + L;
    vf* __restrict outsv = sigv + L;
    vf* __restrict dyv = outsv + L;
    vf* __restrict duv = dyv + L;
    vf* __restrict ddv = duv + L;
    vf* __restrict dzv = ddv + L;
    vf* __restrict g = dzv + L;
    vf* __restrict dAv = g + N;
    vf* __restrict A2 = dAv + N;
    vf* __restrict Av = A2 + N;
    vf* __restrict ones = Av + N;
    std::fill(ones, ones + N, vsplat(1.0f));
    float* my_dA = acc_dA.data() + static_cast<size_t>(tid) * Dm * N;
    float* my_dD = acc_dD.data() + static_cast<size_t>(tid) * Dm;
    float* my_dbias = acc_dbias.data() + static_cast<size_t>(tid) * Dm;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / groups, grp = item % groups;
      const int64_t k0 = grp * nblk / groups, k1 = (grp + 1) * nblk / groups;
      const float* __restrict Bt = p.Bt + b * L * N;
      const float* __restrict Ct = p.Ct + b * L * N;
      std::fill(dBv, dBv + L * N, vf{});
      std::fill(dCv, dCv + L * N, vf{});
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t d0 = k * kLanes;
        const int nc = static_cast<int>(std::min<int64_t>(kLanes, Dm - d0));
        const int64_t row0 = (b * Dm + d0) * L;
        load_tile(p.u + row0, L, nc, uv);
        load_tile(p.delta + row0, L, nc, dtv);
        load_tile(dy + row0, L, nc, dyv);
        const vf bias = p.bias ? lane_vector(p.bias + d0, nc, 1, 0.0f) : vf{};
        dt_tile(dtv, dspv, L, bias, p.softplus);
        if (p.z) {
          load_tile(p.z + row0, L, nc, zv);
          for (int64_t t = 0; t < L; ++t) sigv[t] = vsigmoid(zv[t]);
        }
        const vf skip = p.D ? lane_vector(p.D + d0, nc, 1, 0.0f) : vf{};
        for (int64_t n = 0; n < N; ++n) {
          Av[n] = lane_vector(p.A + d0 * N + n, nc, N, 0.0f);
          A2[n] = Av[n] * kDecayScale<float>;
        }
        // 1. Recompute the states and decays (and the pre-gate output, for dz).
        for (int64_t t = 0; t < L; ++t) {
          const vf dt = dtv[t];
          const vf dtu = dt * uv[t];
          const float* __restrict Bn = Bt + t * N;
          const float* __restrict Cn = Ct + t * N;
          const vf* __restrict hp = t > 0 ? H + (t - 1) * N : nullptr;
          vf* __restrict hc = H + t * N;
          vf* __restrict ec = E + t * N;
          vf acc0{}, acc1{};
          if (hp) {
            int64_t n = 0;
            for (; n + 1 < N; n += 2) {
              const vf a0 = vexp2(dt * A2[n]);
              const vf a1 = vexp2(dt * A2[n + 1]);
              const vf h0 = a0 * hp[n] + dtu * Bn[n];
              const vf h1 = a1 * hp[n + 1] + dtu * Bn[n + 1];
              ec[n] = a0;
              ec[n + 1] = a1;
              hc[n] = h0;
              hc[n + 1] = h1;
              acc0 += h0 * Cn[n];
              acc1 += h1 * Cn[n + 1];
            }
            if (n < N) {
              const vf a0 = vexp2(dt * A2[n]);
              const vf h0 = a0 * hp[n] + dtu * Bn[n];
              ec[n] = a0;
              hc[n] = h0;
              acc0 += h0 * Cn[n];
            }
          } else {
            for (int64_t n = 0; n < N; ++n) {
              ec[n] = vexp2(dt * A2[n]);
              const vf h0 = dtu * Bn[n];
              hc[n] = h0;
              acc0 += h0 * Cn[n];
            }
          }
          if (p.z) outsv[t] = acc0 + acc1 + skip * uv[t];
        }
        // 2. Reverse recurrence.
        if (dlast) {
          for (int64_t n = 0; n < N; ++n)
            g[n] = lane_vector(dlast + (b * Dm + d0) * N + n, nc, N, 0.0f);
        } else {
          std::fill(g, g + N, vf{});
        }
        std::fill(dAv, dAv + N, vf{});
        vf dDacc{}, dbacc{};
        for (int64_t t = L - 1; t >= 0; --t) {
          vf dout = dyv[t];
          if (p.z) {
            const vf zt = zv[t], sig = sigv[t];
            dzv[t] = dout * outsv[t] * sig * (1.0f + zt * (1.0f - sig));
            dout *= zt * sig;
          }
          const vf ut = uv[t];
          dDacc += dout * ut;
          const vf dt = dtv[t];
          const vf dtu = dt * ut;
          const vf* __restrict hc = H + t * N;
          const vf* __restrict ec = E + t * N;
          const vf* __restrict an = t + 1 < L ? E + (t + 1) * N : ones;
          const float* __restrict Bn = Bt + t * N;
          const float* __restrict Cn = Ct + t * N;
          vf* __restrict dBn = dBv + t * N;
          vf* __restrict dCn = dCv + t * N;
          vf sgB0{}, sgB1{}, sga0{}, sga1{};
          if (t > 0) {
            const vf* __restrict hp = H + (t - 1) * N;
            int64_t n = 0;
            for (; n + 1 < N; n += 2) {
              const vf g0 = an[n] * g[n] + dout * Cn[n];
              const vf g1 = an[n + 1] * g[n + 1] + dout * Cn[n + 1];
              dCn[n] += dout * hc[n];
              dCn[n + 1] += dout * hc[n + 1];
              dBn[n] += g0 * dtu;
              dBn[n + 1] += g1 * dtu;
              const vf ga0 = g0 * hp[n] * ec[n];
              const vf ga1 = g1 * hp[n + 1] * ec[n + 1];
              dAv[n] += ga0 * dt;
              dAv[n + 1] += ga1 * dt;
              sga0 += ga0 * Av[n];
              sga1 += ga1 * Av[n + 1];
              sgB0 += g0 * Bn[n];
              sgB1 += g1 * Bn[n + 1];
              g[n] = g0;
              g[n + 1] = g1;
            }
            if (n < N) {
              const vf g0 = an[n] * g[n] + dout * Cn[n];
              dCn[n] += dout * hc[n];
              dBn[n] += g0 * dtu;
              const vf ga0 = g0 * hp[n] * ec[n];
              dAv[n] += ga0 * dt;
              sga0 += ga0 * Av[n];
              sgB0 += g0 * Bn[n];
              g[n] = g0;
            }
          } else {  // h_{-1} = 0: no gradient through the first decay
            for (int64_t n = 0; n < N; ++n) {
              const vf g0 = an[n] * g[n] + dout * Cn[n];
              dCn[n] += dout * hc[n];
              dBn[n] += g0 * dtu;
              sgB0 += g0 * Bn[n];
              g[n] = g0;
            }
          }
          const vf sgB = sgB0 + sgB1, sga = sga0 + sga1;
          duv[t] = dout * skip + dt * sgB;
          const vf ddt = p.softplus ? (sga + ut * sgB) * dspv[t] : sga + ut * sgB;
          ddv[t] = ddt;
          dbacc += ddt;
        }
        store_tile(duv, L, nc, q.du + row0);
        store_tile(ddv, L, nc, q.ddelta + row0);
        if (p.z) store_tile(dzv, L, nc, q.dz + row0);
        for (int c = 0; c < nc; ++c) {
          for (int64_t n = 0; n < N; ++n) my_dA[(d0 + c) * N + n] += dAv[n][c];
          my_dD[d0 + c] += dDacc[c];
          my_dbias[d0 + c] += dbacc[c];
        }
      }
      // Channel-lane partial sums of dB and dC -> this (group, b)'s slab.
      float* __restrict dBt = q.dBt + (grp * Bm + b) * L * N;
      float* __restrict dCt = q.dCt + (grp * Bm + b) * L * N;
      for (int64_t i = 0; i < L * N; ++i) {
        dBt[i] = vsum(dBv[i]);
        dCt[i] = vsum(dCv[i]);
      }
    }
  }
  for (int i = 0; i < nt; ++i) {
    const float* src = acc_dA.data() + static_cast<size_t>(i) * Dm * N;
    for (int64_t k = 0; k < Dm * N; ++k) q.dA[k] += src[k];
    for (int64_t d = 0; d < Dm; ++d) {
      if (q.dD) q.dD[d] += acc_dD[static_cast<size_t>(i) * Dm + d];
      if (q.dbias) q.dbias[d] += acc_dbias[static_cast<size_t>(i) * Dm + d];
    }
  }
  if (groups > 1) {
    const int64_t slab = Bm * L * N;
    const int ntf = num_threads_for(slab / 4096 + 1);
#pragma omp parallel for num_threads(ntf) schedule(static)
    for (int64_t k = 0; k < slab; ++k) {
      float sb = 0.0f, sc = 0.0f;
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
    scan_fwd_f32(make_args<float>(u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus),
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
  // float splits channels in blocks of kLanes, double one channel at a time.
  const int64_t units = u.scalar_type() == at::kDouble ? Dm : Blocks(Dm).count;
  const int64_t groups = (Bm == 0 || Bm >= 4 * nt)
                             ? 1
                             : std::clamp<int64_t>((4 * nt + Bm - 1) / Bm, 1,
                                                   std::max<int64_t>(units, 1));
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
    const ScanArgs<T> args = make_args<T>(u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus);
    const T* dlast_ptr = present(dlast) ? dlast->const_data_ptr<T>() : nullptr;
    if constexpr (std::is_same_v<T, float>) {
      scan_bwd_f32(args, dy.const_data_ptr<T>(), dlast_ptr, q, groups);
    } else {
      scan_bwd<T>(args, dy.const_data_ptr<T>(), dlast_ptr, q, groups);
    }
  };
  if (u.scalar_type() == at::kDouble) {
    run(double{});
  } else {
    run(float{});
  }
  return {du, ddelta, dA, dBt.select(0, 0), dCt.select(0, 0), dD, dz, dbias};
}

// ---------------------------------------------------------------------------------------------
// Depthwise causal conv1d (Mamba's short conv, any width W), with an optional fused SiLU, and
// its backward; and the elementwise apply of FastDropout. One (b, d) row of L steps at a time,
// rows split over threads, the loop over t vectorised.
//   y[t] = act(bias + sum_k w[k] * x[t - (W - 1) + k])          (x[< 0] = 0)
// ---------------------------------------------------------------------------------------------

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


// ---------------------------------------------------------------------------------------------
// Streaming inference, one step, no autograd: the conv-state update and the SSM-state update,
// each one pass over its state, updating it in place.
// ---------------------------------------------------------------------------------------------

template <typename T>
void conv_update_kernel(const T* x, T* state, const T* w, const T* bias, bool silu, int64_t rows,
                        int64_t Dm, int64_t W, T* y) {
  const int nt = num_threads_for(rows / 65536 + 1);  // tiny work: waking a thread costs more
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t d = r % Dm;
    T* __restrict s = state + r * W;
    const T* __restrict wr = w + d * W;
    for (int64_t k = 0; k + 1 < W; ++k) s[k] = s[k + 1];
    s[W - 1] = x[r];
    T acc = bias ? bias[d] : T(0);
    for (int64_t k = 0; k < W; ++k) acc += wr[k] * s[k];
    y[r] = silu ? acc * sigmoid(acc) : acc;
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
    T acc = T(0);
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < N; ++n) {
      const T hn = decay_exp(dts * a[n]) * h[n] + dtx * bn[n];
      h[n] = hn;
      acc += cn[n] * hn;
    }
    y[r] = acc;
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

TORCH_LIBRARY(torchrec_mamba_scan, m) {
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor Bt, Tensor Ct, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus) -> (Tensor, Tensor)");
  m.def(
      "selective_scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor Bt, Tensor Ct, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor dy, Tensor? dlast) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, bool silu) -> Tensor");
  m.def(
      "causal_conv1d_bwd(Tensor x, Tensor weight, Tensor? bias, bool silu, Tensor dy) -> "
      "(Tensor, Tensor, Tensor)");
  m.def("dropout_apply(Tensor x, Tensor draw, int threshold, float scale) -> Tensor");
  m.def("dropout_fwd(Tensor x, int seed, int threshold, float scale) -> (Tensor, Tensor)");
  m.def(
      "causal_conv1d_update_cpu(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, "
      "bool silu) -> Tensor");
  m.def(
      "selective_state_update_cpu(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, "
      "Tensor C, Tensor? D, Tensor? z, Tensor? dt_bias, bool dt_softplus) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchrec_mamba_scan, CPU, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd);
  m.impl("selective_scan_bwd", &selective_scan_bwd);
  m.impl("causal_conv1d_fwd", &causal_conv1d_fwd);
  m.impl("causal_conv1d_bwd", &causal_conv1d_bwd);
  m.impl("dropout_apply", &dropout_apply);
  m.impl("dropout_fwd", &dropout_fwd);
  m.impl("causal_conv1d_update_cpu", &causal_conv1d_update_cpu);
  m.impl("selective_state_update_cpu", &selective_state_update_cpu);
}
