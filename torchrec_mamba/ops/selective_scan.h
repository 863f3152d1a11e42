// Internal header of the selective-scan CPU kernel: the argument structs shared by its float64
// (selective_scan.cpp) and channel-vectorised float32 (selective_scan_f32.cpp) halves.
#pragma once

#include "kernel_common.h"

namespace torchrec_mamba_cpu {

// Steps between two state checkpoints: the backward's per-chunk buffers (states, decays and
// the lane partial sums of dB, dC: 4 x kChunk x N vectors, 512 KiB at N = 32 with AVX-512)
// stay in L2.
constexpr int64_t kChunk = 64;

inline int64_t num_chunks(int64_t L) { return (L + kChunk - 1) / kChunk; }

// Element (b, d, t) of a (B, D, L) tensor lies at b * this->b + d * this->d + t * this->t.
struct Strides {
  int64_t b, d, t;
  int64_t at(int64_t bi, int64_t di, int64_t ti) const { return bi * b + di * d + ti * t; }
};

inline Strides strides_of(const at::Tensor& x) { return {x.stride(0), x.stride(1), x.stride(2)}; }

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
  Strides su, sdelta, sz;  // float: any layout (contiguous, or channels-last (B, L, D) memory)
  // Low-rank time step (float only): with dt_w, delta is the (B, R, L) input of dt_proj and the
  // kernel computes the time step dt_w @ delta (dt_w (D, R), contiguous) tile by tile.
  const T* dt_w = nullptr;
  int64_t rank = 0;
};

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
  // With ScanArgs::dt_w (ddelta is then unused): the gradients of the low-rank input and of
  // dt_w.
  T* ddt_low = nullptr;  // (G, B, L, R), zeroed
  T* ddt_w = nullptr;    // (D, R), zeroed
};

// dt = softplus(delta + bias) (or delta + bias) over a row of n steps; dsp, when given, gets
// d dt / d delta.
template <typename T>
inline void dt_row(const T* __restrict delta, T bias, bool sp, int64_t n, T* __restrict dts,
                   T* __restrict dsp) {
  if (!sp) {
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) dts[t] = delta[t] + bias;
    return;
  }
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) dts[t] = softplus(delta[t] + bias);
  if (dsp) {
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) dsp[t] = softplus_grad(delta[t] + bias);
  }
}

// Sum the per-thread partial sums of dA, dD, d bias into the outputs, and fold the channel
// group partial sums of dB and dC into group 0.
template <typename T>
void reduce_partials(const ScanGrads<T>& q, const std::vector<T>& acc_dA,
                     const std::vector<T>& acc_dD, const std::vector<T>& acc_dbias, int nt,
                     int64_t Dm, int64_t N, int64_t slab, int64_t groups) {
  for (int i = 0; i < nt; ++i) {
    const T* src = acc_dA.data() + static_cast<size_t>(i) * Dm * N;
    for (int64_t k = 0; k < Dm * N; ++k) q.dA[k] += src[k];
    for (int64_t d = 0; d < Dm; ++d) {
      if (q.dD) q.dD[d] += acc_dD[static_cast<size_t>(i) * Dm + d];
      if (q.dbias) q.dbias[d] += acc_dbias[static_cast<size_t>(i) * Dm + d];
    }
  }
  if (groups <= 1) return;
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

// Gradient layouts: dy, and du / d delta / dz (each like its input).
struct GradStrides {
  Strides dy, du, ddelta, dz;
};

inline int64_t num_blocks(int64_t dim) { return (dim + kLanes - 1) / kLanes; }

// The float32 kernels (selective_scan_f32.cpp); checkpoints: (B, channel blocks, chunks, N)
// vectors, y / the gradients in the layouts their strides give.
void scan_fwd_f32(const ScanArgs<float>& p, float* __restrict y, const Strides& sy,
                  float* __restrict last, vf* ckpt);
void scan_bwd_f32(const ScanArgs<float>& p, const vf* ckpt, const float* dy, const float* dlast,
                  const ScanGrads<float>& q, const GradStrides& gs, int64_t groups);

}  // namespace torchrec_mamba_cpu
