// The channel-vectorised float32 selective scan (forward and chunked backward); see the notes
// at the top of selective_scan.cpp. One SIMD vector holds kLanes channels of one batch row.

#include "selective_scan.h"

namespace torchrec_mamba_cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// float32: the channel-vectorised kernel. One SIMD vector holds kLanes channels of one batch
// row, so every per-(b, d, t) scalar (dt, u, the output, du, d delta) is one vector op and the
// sum over the state index n is a plain vertical FMA: no horizontal reductions in the
// recurrence. B_t[n] and C_t[n] are shared by all channels of a batch row and are broadcast.
// Rows of u, delta, z and dy are transposed into (steps, kLanes) tiles first (a partial last
// block is zero-padded: A = 0 and u = 0 keep its state at 0); results are transposed back.
// Checkpoints: (B, channel blocks, chunks, N) vectors.
// ---------------------------------------------------------------------------------------------

// Steps [0, n) of channels [0, nc) from base (the element (b, d0, t0)) -> an (n, kLanes) tile,
// zero-padded. Channels-last memory (s.d == 1) is a copy of nc contiguous floats per step.
inline void load_tile(const float* __restrict base, const Strides& s, int64_t n, int nc,
                      vf* __restrict tile) {
  if (nc < kLanes) std::fill(tile, tile + n, vf{});
  float* __restrict t = reinterpret_cast<float*>(tile);
  if (s.d == 1) {
    for (int64_t i = 0; i < n; ++i) std::copy(base + i * s.t, base + i * s.t + nc, t + i * kLanes);
    return;
  }
  for (int c = 0; c < nc; ++c) {
    const float* __restrict r = base + c * s.d;
    for (int64_t i = 0; i < n; ++i) t[i * kLanes + c] = r[i * s.t];
  }
}

inline void store_tile(const vf* __restrict tile, const Strides& s, int64_t n, int nc,
                       float* __restrict base) {
  const float* __restrict t = reinterpret_cast<const float*>(tile);
  if (s.d == 1) {
    for (int64_t i = 0; i < n; ++i) std::copy(t + i * kLanes, t + i * kLanes + nc, base + i * s.t);
    return;
  }
  for (int c = 0; c < nc; ++c) {
    float* __restrict r = base + c * s.d;
    for (int64_t i = 0; i < n; ++i) r[i * s.t] = t[i * kLanes + c];
  }
}

inline vf lane_vector(const float* __restrict src, int nc, int64_t stride, float pad) {
  vf v = vsplat(pad);
  for (int c = 0; c < nc; ++c) v[c] = src[c * stride];
  return v;
}

// The raw time step of steps [t0, t0 + n) of channels [d0, d0 + kLanes) into dtv: a tile of
// delta, or with p.dt_w the low-rank product dt_w @ delta (Wv: the R columns of dt_w for the
// block's channels, zero past the last channel).
inline void load_dt(const ScanArgs<float>& p, int64_t b, int64_t d0, int64_t t0, int64_t n, int nc,
                    const vf* __restrict Wv, vf* __restrict dtv) {
  if (!p.dt_w) {
    load_tile(p.delta + p.sdelta.at(b, d0, t0), p.sdelta, n, nc, dtv);
    return;
  }
  const float* __restrict x = p.delta + p.sdelta.at(b, 0, t0);
  const int64_t st = p.sdelta.t, sr = p.sdelta.d, R = p.rank;
  for (int64_t i = 0; i < n; ++i) {
    vf acc{};
    for (int64_t r = 0; r < R; ++r) acc += Wv[r] * x[i * st + r * sr];
    dtv[i] = acc;
  }
}

inline void load_dt_weights(const ScanArgs<float>& p, int64_t d0, int nc, vf* __restrict Wv) {
  for (int64_t r = 0; r < p.rank; ++r) Wv[r] = lane_vector(p.dt_w + d0 * p.rank + r, nc, p.rank, 0.0f);
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

}  // namespace

void scan_fwd_f32(const ScanArgs<float>& p, float* __restrict y, const Strides& sy,
                  float* __restrict last, vf* ckpt) {
  const int64_t L = p.len, N = p.nstate, Dm = p.dim, nck = num_chunks(L);
  const int64_t nblk = num_blocks(Dm);
  const int64_t items = p.batch * nblk;
  const int nt = num_threads_for(items);
  const int64_t per_thread = 4 * L + 2 * N + p.rank;  // in vectors
  std::vector<vf> scratch(static_cast<size_t>(nt * per_thread));
#pragma omp parallel num_threads(nt)
  {
    vf* __restrict dtv = scratch.data() + thread_id() * per_thread;  // (L,) dt
    vf* __restrict uv = dtv + L;                                      // (L,) u
    vf* __restrict accv = uv + L;                                     // (L,) C . h, then y
    vf* __restrict zv = accv + L;                                     // (L,) z
    vf* __restrict h = zv + L;                                        // (N,) state
    vf* __restrict Av = h + N;                                        // (N,) A
    vf* __restrict Wv = Av + N;                                       // (R,) dt_w columns
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / nblk, d0 = (item % nblk) * kLanes;
      const int nc = static_cast<int>(std::min<int64_t>(kLanes, Dm - d0));
      load_tile(p.u + p.su.at(b, d0, 0), p.su, L, nc, uv);
      if (p.dt_w) load_dt_weights(p, d0, nc, Wv);
      load_dt(p, b, d0, 0, L, nc, Wv, dtv);
      const vf bias = p.bias ? lane_vector(p.bias + d0, nc, 1, 0.0f) : vf{};
      dt_tile(dtv, nullptr, L, bias, p.softplus);
      for (int64_t n = 0; n < N; ++n) Av[n] = lane_vector(p.A + d0 * N + n, nc, N, 0.0f);
      std::fill(h, h + N, vf{});
      const float* __restrict Bt = p.Bt + b * L * N;
      const float* __restrict Ct = p.Ct + b * L * N;
      vf* my_ckpt = ckpt ? ckpt + item * nck * N : nullptr;
      for (int64_t t = 0; t < L; ++t) {
        if (my_ckpt && t % kChunk == 0) std::copy(h, h + N, my_ckpt + (t / kChunk) * N);
        const vf dt = dtv[t];
        accv[t] = ssm_step(dt * kDecayScale<float>, dt * uv[t], Av, h, h,
                           static_cast<vf*>(nullptr), Bt + t * N, Ct + t * N, N);
      }
      // D skip and silu(z) gate, on the tile.
      const vf skip = p.D ? lane_vector(p.D + d0, nc, 1, 0.0f) : vf{};
      if (p.z) {
        load_tile(p.z + p.sz.at(b, d0, 0), p.sz, L, nc, zv);
        for (int64_t t = 0; t < L; ++t) accv[t] = (accv[t] + skip * uv[t]) * (zv[t] * vsigmoid(zv[t]));
      } else {
        for (int64_t t = 0; t < L; ++t) accv[t] += skip * uv[t];
      }
      store_tile(accv, sy, L, nc, y + sy.at(b, d0, 0));
      for (int c = 0; c < nc; ++c) {
        for (int64_t n = 0; n < N; ++n) last[(b * Dm + d0 + c) * N + n] = h[n][c];
      }
    }
  }
}

namespace {

// Per-thread buffers of the float backward (in vectors): one chunk's states, decays, lane
// partial sums of dB and dC and row tiles, plus per channel block of the group the carried
// gradient and the dA / dD / d bias partial sums, which live across chunks.
struct VecScratch {
  vf *H, *E, *dBv, *dCv;                                      // (kChunk, N)
  vf *dtv, *dspv, *uv, *zv, *sigv, *outsv, *dyv, *duv, *ddv, *dzv;  // (kChunk,)
  vf* Av;                                                      // (N,)
  vf *carry, *dA, *dD, *db;  // (blocks, N), (blocks, N), (blocks,), (blocks,)
  // Low-rank time step only (R = rank, else empty): the block's dt_w columns, the chunk's
  // lane partial sums of d dt_low, and per block of the group the d dt_w partial sums.
  vf *Wv, *ddl, *dW;  // (R,), (kChunk, R), (blocks, R)
  static int64_t size(int64_t N, int64_t blocks, int64_t R) {
    return 4 * kChunk * N + 10 * kChunk + N + blocks * (2 * N + 2) + R * (1 + kChunk + blocks);
  }
  VecScratch(vf* s, int64_t N, int64_t blocks, int64_t R) {
    H = s, E = H + kChunk * N, dBv = E + kChunk * N, dCv = dBv + kChunk * N;
    dtv = dCv + kChunk * N, dspv = dtv + kChunk, uv = dspv + kChunk, zv = uv + kChunk;
    sigv = zv + kChunk, outsv = sigv + kChunk, dyv = outsv + kChunk, duv = dyv + kChunk;
    ddv = duv + kChunk, dzv = ddv + kChunk, Av = dzv + kChunk;
    carry = Av + N, dA = carry + blocks * N, dD = dA + blocks * N, db = dD + blocks;
    Wv = db + blocks, ddl = Wv + R, dW = ddl + kChunk * R;
  }
};

// The reverse recurrence over one chunk of one channel block (after its recompute into s.H,
// s.E); h0 is the state entering the chunk. Writes du, d delta, dz into the tiles and adds to
// the block's carried gradient, dA, dD, d bias and the chunk's dB / dC lane sums.
inline void reverse_chunk_f32(VecScratch& s, int64_t n_t, int64_t N, const vf* h0, vf skip,
                              bool has_z, bool softplus, const float* Bt, const float* Ct,
                              vf* carry, vf* dAv, vf& dDacc, vf& dbacc) {
  for (int64_t i = n_t - 1; i >= 0; --i) {
    vf dout = s.dyv[i];
    if (has_z) {
      const vf zt = s.zv[i], sig = s.sigv[i];
      s.dzv[i] = dout * s.outsv[i] * sig * (1.0f + zt * (1.0f - sig));
      dout *= zt * sig;
    }
    const vf ut = s.uv[i], dt = s.dtv[i], dtu = dt * ut;
    dDacc += dout * ut;
    const vf* __restrict hp = i > 0 ? s.H + (i - 1) * N : h0;
    const vf* __restrict hc = s.H + i * N;
    const vf* __restrict ec = s.E + i * N;
    const vf* __restrict Av = s.Av;
    const float* __restrict Bn = Bt + i * N;
    const float* __restrict Cn = Ct + i * N;
    vf* __restrict dBn = s.dBv + i * N;
    vf* __restrict dCn = s.dCv + i * N;
    vf sgB0{}, sgB1{}, sga0{}, sga1{};
    // One n: g = d loss / d h_t; carry <- exp(dt_t A) g for step t - 1; ga = d loss / d (dt A).
    auto one = [&](int64_t n, vf& sgB, vf& sga) {
      const vf g = carry[n] + dout * Cn[n];
      const vf ag = g * ec[n];
      dCn[n] += dout * hc[n];
      dBn[n] += g * dtu;
      const vf ga = ag * hp[n];
      dAv[n] += ga * dt;
      sga += ga * Av[n];
      sgB += g * Bn[n];
      carry[n] = ag;
    };
    int64_t n = 0;
    for (; n + 1 < N; n += 2) {
      one(n, sgB0, sga0);
      one(n + 1, sgB1, sga1);
    }
    if (n < N) one(n, sgB0, sga0);
    const vf sgB = sgB0 + sgB1, sga = sga0 + sga1;
    s.duv[i] = dout * skip + dt * sgB;
    const vf ddt = softplus ? (sga + ut * sgB) * s.dspv[i] : sga + ut * sgB;
    s.ddv[i] = ddt;
    dbacc += ddt;
  }
}

}  // namespace

void scan_bwd_f32(const ScanArgs<float>& p, const vf* ckpt, const float* dy, const float* dlast,
                  const ScanGrads<float>& q, const GradStrides& gs, int64_t groups) {
  const int64_t L = p.len, N = p.nstate, Dm = p.dim, Bm = p.batch, nck = num_chunks(L);
  const int64_t nblk = num_blocks(Dm);
  const int64_t items = Bm * groups;
  const int64_t max_blocks = (nblk + groups - 1) / groups;
  const int nt = num_threads_for(items);
  std::vector<float> acc_dA(static_cast<size_t>(nt) * Dm * N, 0.0f);
  std::vector<float> acc_dD(static_cast<size_t>(nt) * Dm, 0.0f);
  std::vector<float> acc_dbias(static_cast<size_t>(nt) * Dm, 0.0f);
  const int64_t R = p.dt_w ? p.rank : 0;
  std::vector<float> acc_dW(static_cast<size_t>(nt) * Dm * R, 0.0f);
  const int64_t per_thread = VecScratch::size(N, max_blocks, R);
  std::vector<vf> scratch(static_cast<size_t>(nt * per_thread));
#pragma omp parallel num_threads(nt)
  {
    const int tid = thread_id();
    VecScratch s(scratch.data() + tid * per_thread, N, max_blocks, R);
    float* my_dA = acc_dA.data() + static_cast<size_t>(tid) * Dm * N;
    float* my_dW = acc_dW.data() + static_cast<size_t>(tid) * Dm * R;
    float* my_dD = acc_dD.data() + static_cast<size_t>(tid) * Dm;
    float* my_dbias = acc_dbias.data() + static_cast<size_t>(tid) * Dm;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / groups, grp = item % groups;
      const int64_t k0 = grp * nblk / groups, k1 = (grp + 1) * nblk / groups;
      float* __restrict dBt = q.dBt + (grp * Bm + b) * L * N;
      float* __restrict dCt = q.dCt + (grp * Bm + b) * L * N;
      float* __restrict ddlt = R ? q.ddt_low + (grp * Bm + b) * L * R : nullptr;
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t j = k - k0, d0 = k * kLanes;
        const int nc = static_cast<int>(std::min<int64_t>(kLanes, Dm - d0));
        for (int64_t n = 0; n < N; ++n) {
          s.carry[j * N + n] = dlast ? lane_vector(dlast + (b * Dm + d0) * N + n, nc, N, 0.0f) : vf{};
          s.dA[j * N + n] = vf{};
        }
        s.dD[j] = vf{};
        s.db[j] = vf{};
        for (int64_t r = 0; r < R; ++r) s.dW[j * R + r] = vf{};
      }
      for (int64_t c = nck - 1; c >= 0; --c) {
        const int64_t t0 = c * kChunk, n_t = std::min(kChunk, L - t0);
        const float* __restrict Bt = p.Bt + (b * L + t0) * N;
        const float* __restrict Ct = p.Ct + (b * L + t0) * N;
        std::fill(s.dBv, s.dBv + n_t * N, vf{});
        std::fill(s.dCv, s.dCv + n_t * N, vf{});
        if (R) std::fill(s.ddl, s.ddl + n_t * R, vf{});
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t j = k - k0, d0 = k * kLanes;
          const int nc = static_cast<int>(std::min<int64_t>(kLanes, Dm - d0));
          load_tile(p.u + p.su.at(b, d0, t0), p.su, n_t, nc, s.uv);
          if (R) load_dt_weights(p, d0, nc, s.Wv);
          load_dt(p, b, d0, t0, n_t, nc, s.Wv, s.dtv);
          load_tile(dy + gs.dy.at(b, d0, t0), gs.dy, n_t, nc, s.dyv);
          const vf bias = p.bias ? lane_vector(p.bias + d0, nc, 1, 0.0f) : vf{};
          dt_tile(s.dtv, s.dspv, n_t, bias, p.softplus);
          if (p.z) {
            load_tile(p.z + p.sz.at(b, d0, t0), p.sz, n_t, nc, s.zv);
            for (int64_t i = 0; i < n_t; ++i) s.sigv[i] = vsigmoid(s.zv[i]);
          }
          const vf skip = p.D ? lane_vector(p.D + d0, nc, 1, 0.0f) : vf{};
          for (int64_t n = 0; n < N; ++n) s.Av[n] = lane_vector(p.A + d0 * N + n, nc, N, 0.0f);
          // 1. Recompute the chunk's states and decays from its checkpoint.
          const vf* h0 = ckpt + ((b * nblk + k) * nck + c) * N;
          for (int64_t i = 0; i < n_t; ++i) {
            const vf dt = s.dtv[i];
            const vf acc = ssm_step<false, true>(dt * kDecayScale<float>, dt * s.uv[i], s.Av,
                                                 i > 0 ? s.H + (i - 1) * N : h0, s.H + i * N,
                                                 s.E + i * N, Bt + i * N, Ct + i * N, N);
            if (p.z) s.outsv[i] = acc + skip * s.uv[i];
          }
          // 2. Reverse recurrence over the chunk.
          reverse_chunk_f32(s, n_t, N, h0, skip, p.z != nullptr, p.softplus, Bt, Ct,
                            s.carry + j * N, s.dA + j * N, s.dD[j], s.db[j]);
          store_tile(s.duv, gs.du, n_t, nc, q.du + gs.du.at(b, d0, t0));
          if (R) {
            // d dt_w[d, r] += sum_t g[d, t] dt_low[r, t]; d dt_low[r, t] += sum_d g[d, t] dt_w[d, r]
            // (lane partial sums, over the blocks of the group; g is zero in padding lanes).
            const float* __restrict x = p.delta + p.sdelta.at(b, 0, t0);
            const int64_t st = p.sdelta.t, sr = p.sdelta.d;
            vf* __restrict dWj = s.dW + j * R;
            for (int64_t i = 0; i < n_t; ++i) {
              const vf g = s.ddv[i];
              for (int64_t r = 0; r < R; ++r) {
                dWj[r] += g * x[i * st + r * sr];
                s.ddl[i * R + r] += g * s.Wv[r];
              }
            }
          } else {
            store_tile(s.ddv, gs.ddelta, n_t, nc, q.ddelta + gs.ddelta.at(b, d0, t0));
          }
          if (p.z) store_tile(s.dzv, gs.dz, n_t, nc, q.dz + gs.dz.at(b, d0, t0));
        }
        // The chunk's channel-lane partial sums of dB and dC -> this (group, b)'s slab.
        vsum_many(s.dBv, n_t * N, dBt + t0 * N);
        vsum_many(s.dCv, n_t * N, dCt + t0 * N);
        if (R) vsum_many(s.ddl, n_t * R, ddlt + t0 * R);
      }
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t j = k - k0, d0 = k * kLanes;
        const int nc = static_cast<int>(std::min<int64_t>(kLanes, Dm - d0));
        for (int c = 0; c < nc; ++c) {
          for (int64_t n = 0; n < N; ++n) my_dA[(d0 + c) * N + n] += s.dA[j * N + n][c];
          my_dD[d0 + c] += s.dD[j][c];
          my_dbias[d0 + c] += s.db[j][c];
          for (int64_t r = 0; r < R; ++r) my_dW[(d0 + c) * R + r] += s.dW[j * R + r][c];
        }
      }
    }
  }
  reduce_partials(q, acc_dA, acc_dD, acc_dbias, nt, Dm, N, Bm * L * N, groups);
  if (R) {
    for (int i = 0; i < nt; ++i) {
      const float* src = acc_dW.data() + static_cast<size_t>(i) * Dm * R;
      for (int64_t k = 0; k < Dm * R; ++k) q.ddt_w[k] += src[k];
    }
    const int64_t slab = Bm * L * R;
    for (int64_t grp = 1; grp < groups; ++grp) {
      for (int64_t k = 0; k < slab; ++k) q.ddt_low[k] += q.ddt_low[grp * slab + k];
    }
  }
}

}  // namespace torchrec_mamba_cpu
