// Fast path of the item kernels for 3-core float32 tables whose middle core has
// q_1*r_2 == 128 columns (e.g. the seed shapes q = (4,4,4), ranks (1,32,32,1)):
// one warp per item, the sums in registers.
//
// Lane l owns the 4 columns c = 4l..4l+3 of the prefix product
// P = G_0[i_0] G_1[i_1] (Q0 x 128), i.e. j_1 = 4l / R2 and b = 4l % R2 .. +3.
//   forward: row(j0, j1, j2) = sum_b P[j0][j1*R2 + b] G_2[i_2][b][j2]: 4 b per lane,
//            then a reduce-scatter over the R2/4 lanes of one j1 (fixed butterfly).
//   backward: Y = dP += g R^T in registers (same layout as P); X = P^T g per row,
//            reduce-scattered over the Q1 lanes with the same b; dT_0 = Y G_1^T,
//            reduce-scattered over the warp. All sums in a fixed order (deterministic).
// Memory latency: each warp copies the G_2 slices of up to 8 rows (and, backward, the
// output-gradient rows of their first 16 positions) to shared memory with asynchronous
// copies, all in flight together; the first batch lands while P is computed. (G_1 slices
// are read through L1: consecutive items share i_1. Copying a block's G_1 slice to shared
// memory instead was slower: benchmarks/NOTES.md, v7c.)
// Records written are the ones of the generic item kernel (same layouts), so the
// slice-gradient reductions are shared.
#pragma once

#include <cstdint>

namespace torchrec_tt {
namespace cuda_detail {

constexpr int kFastWarps = 4;
constexpr int kFastItemsPerWarp = 4;
constexpr int kStageRows = 8;        // G_2 slices staged per chunk of an item's rows
constexpr int kStagePositions = 16;  // output-gradient rows staged per chunk (backward)

struct FastArgs {
  const float* c0;
  const float* c1;
  const float* c2;
  const int32_t* counts;
  const int32_t* item_urow;
  const int32_t* urow_start;
  const int32_t* item_d0;
  const int32_t* item_d1;
  const int32_t* urow_d2;
  float* rowbuf;  // forward: [urows, D]
  const float* grad_out;  // backward: [B, D]
  const int32_t* sbag;
  const float* sscale;
  float* xbuf;    // [urows, R2*Q2]
  float* tbuf1;   // [items, Q0*R1] (T_0 = slice of core 0)
  float* dtbuf0;  // [items, Q0*R1]
  float* dtbuf1;  // [items, Q0*128]
};

// Reduce-scatter of N values over the lanes that differ in bits OFF, OFF/2, ..,
// OFF_LO: afterwards v[0 .. N / lanes) hold the sums of the indices
// scatter_base(lane) + i. Fixed order: deterministic.
template <int N, int OFF, int OFF_LO>
struct ReduceScatter {
  static __device__ __forceinline__ void run(float* v, int lane) {
    if constexpr (OFF > 0 && OFF >= OFF_LO) {
      constexpr int H = N / 2;
      const bool upper = (lane & OFF) != 0;
#pragma unroll
      for (int i = 0; i < H; ++i) {
        const float send = upper ? v[i] : v[i + H];
        const float keep = upper ? v[i + H] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
      }
      ReduceScatter<H, OFF / 2, OFF_LO>::run(v, lane);
    }
  }
};

template <int N, int OFF, int OFF_LO>
__device__ __forceinline__ int scatter_base(int lane) {
  int base = 0, half = N / 2;
#pragma unroll
  for (int off = OFF; off > 0 && off >= OFF_LO; off >>= 1) {
    if (lane & off) base += half;
    half >>= 1;
  }
  return base;
}

// Asynchronous 16-byte copies global -> shared (no registers held while in flight).
__device__ __forceinline__ void cp_async16_ca(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async16_cg(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// Position of float4 `f` of a staged G_2 slice: lane l reads float4s 4(l % 8) + c,
// c = 0..3; the XOR spreads the 8 lanes of a quarter-warp over all 8 bank groups.
__device__ __forceinline__ int g2_swizzle(int f) {
  return f ^ ((f >> 3) & 3);
}

template <int Q0, int R1, int R2, int Q2, bool BWD>
__global__ void __launch_bounds__(kFastWarps * 32) tt_fast_item_kernel(const FastArgs a) {
  constexpr int N1 = 128;       // q1 * r2
  constexpr int Q1 = N1 / R2;
  constexpr int G = R2 / 4;     // lanes of one j1
  constexpr int D = Q0 * Q1 * Q2;
  constexpr int S0 = Q0 * R1, S1 = R1 * N1, S2 = R2 * Q2;
  static_assert(R1 % 8 == 0 && R1 <= 32 && R2 % 4 == 0 && N1 % R2 == 0 && Q2 == 4 && Q0 == 4, "fast path shapes");
  static_assert((Q0 * Q2) % G == 0 && (4 * Q2) % Q1 == 0, "fast path shapes");
  // staging: a G_2 slice is one float4 per lane, an output-gradient row 16 float4
  static_assert(S2 == 128 && D == 64, "staged fast path shapes");
  constexpr int KR = kStageRows;
  constexpr int KP = BWD ? kStagePositions : 0;
  constexpr int kStageFloats = KR * S2 + KP * D;
  constexpr unsigned kAll = 0xffffffffu;
  __shared__ __align__(16) float t0s_all[kFastWarps][R1 * Q0];
  __shared__ __align__(16) float stage_all[kFastWarps][kStageFloats];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  float* const t0s = t0s_all[wid];
  float* const g2s = stage_all[wid];  // [KR][S2], float4s swizzled (g2_swizzle)
  float* const gos = g2s + KR * S2;   // [KP][D] (backward)
  const int nitems = a.counts[0];
  const int it0 = (blockIdx.x * kFastWarps + wid) * kFastItemsPerWarp;
  const int it1 = min(it0 + kFastItemsPerWarp, nitems);
  const int j1 = (4 * lane) / R2, b0 = (4 * lane) % R2;
  for (int it = it0; it < it1; ++it) {
    const float* g0 = a.c0 + static_cast<int64_t>(a.item_d0[it]) * S0;
    const float* g1 = a.c1 + static_cast<int64_t>(a.item_d1[it]) * S1;
    const int u0 = a.item_urow[it], u1 = a.item_urow[it + 1];
    // Metadata of the item's rows (<= 64) and positions (<= 64), one load per lane,
    // handed around by shuffles: no row waits on a metadata load.
    const int nu = u1 - u0;
    const int d2a = lane < nu ? a.urow_d2[u0 + lane] : 0;
    const int d2b = lane + 32 < nu ? a.urow_d2[u0 + lane + 32] : 0;
    int sta = 0, stb = 0, bga = 0, bgb = 0, p0 = 0, p1 = 0;
    float sca = 0.f, scb = 0.f;
    if constexpr (BWD) {
      sta = lane < nu ? a.urow_start[u0 + lane] : 0;
      stb = lane + 32 < nu ? a.urow_start[u0 + lane + 32] : 0;
      p0 = __shfl_sync(kAll, sta, 0);
      p1 = a.urow_start[u1];
      const int np = p1 - p0;
      if (lane < np) {
        bga = a.sbag[p0 + lane];
        sca = a.sscale[p0 + lane];
      }
      if (lane + 32 < np) {
        bgb = a.sbag[p0 + lane + 32];
        scb = a.sscale[p0 + lane + 32];
      }
    }
    // first position of the item's row ui (ui == nu: one past the last), relative to p0
    auto row_start = [&](int ui) {
      const int v = __shfl_sync(kAll, ui < 32 ? sta : stb, ui & 31);
      return (ui == nu ? p1 : v) - p0;
    };
    // Staging of the rows [c0, c0 + KR) (item-relative) and, backward, of the first KP
    // positions' output-gradient rows: all copies in flight at once.
    auto stage = [&](int c0) {
      const int cn = min(KR, nu - c0);
      for (int r = 0; r < cn; ++r) {
        const int ui = c0 + r;
        const int d2 = __shfl_sync(kAll, ui < 32 ? d2a : d2b, ui & 31);
        cp_async16_ca(g2s + r * S2 + 4 * g2_swizzle(lane), a.c2 + static_cast<int64_t>(d2) * S2 + 4 * lane);
      }
      if constexpr (BWD) {
        const int pa = row_start(c0);
        const int npos = min(row_start(c0 + cn) - pa, KP);
        for (int j = 0; j < npos; j += 2) {
          const int jj = j + (lane >> 4), i = pa + jj;
          const int ba = __shfl_sync(kAll, bga, i & 31), bb = __shfl_sync(kAll, bgb, i & 31);
          if (jj < npos) {
            cp_async16_cg(
                gos + jj * D + 4 * (lane & 15), a.grad_out + static_cast<int64_t>(i < 32 ? ba : bb) * D + 4 * (lane & 15));
          }
        }
      }
    };
    stage(0);  // lands while P is computed
    __syncwarp();
    if (lane < R1) {
#pragma unroll
      for (int j0 = 0; j0 < Q0; ++j0) {
        const float v = __ldg(g0 + j0 * R1 + lane);
        t0s[lane * Q0 + j0] = v;
        if (BWD) a.tbuf1[static_cast<int64_t>(it) * S0 + j0 * R1 + lane] = v;
      }
    }
    __syncwarp();
    // P = T_0 G_1: acc[j0][c] for the lane's 4 columns.
    float acc[Q0][4];
#pragma unroll
    for (int j0 = 0; j0 < Q0; ++j0)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[j0][c] = 0.f;
#pragma unroll 8
    for (int r = 0; r < R1; ++r) {
      const float4 bv = __ldg(reinterpret_cast<const float4*>(g1 + r * N1) + lane);
      const float4 tv = *reinterpret_cast<const float4*>(t0s + r * Q0);
      const float t[4] = {tv.x, tv.y, tv.z, tv.w};
      const float b[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int j0 = 0; j0 < Q0; ++j0)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[j0][c] = fmaf(t[j0], b[c], acc[j0][c]);
    }

    float y[Q0][4];
#pragma unroll
    for (int j0 = 0; j0 < Q0; ++j0)
#pragma unroll
      for (int c = 0; c < 4; ++c) y[j0][c] = 0.f;
    for (int c0 = 0; c0 < nu; c0 += KR) {  // chunks of KR rows (item-relative)
      const int cn = min(KR, nu - c0);
      if (c0 > 0) stage(c0);
      cp_async_wait_all();
      __syncwarp();
      const int pa = BWD ? row_start(c0) : 0;
      for (int ui = c0; ui < c0 + cn; ++ui) {
        const int u = u0 + ui;
        float rr[4][Q2];
        const float* g2 = g2s + (ui - c0) * S2;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const float4 v = *reinterpret_cast<const float4*>(g2 + 4 * g2_swizzle(b0 + c));
          rr[c][0] = v.x;
          rr[c][1] = v.y;
          rr[c][2] = v.z;
          rr[c][3] = v.w;
        }
        if constexpr (!BWD) {
          float v[Q0 * Q2];
#pragma unroll
          for (int j0 = 0; j0 < Q0; ++j0)
#pragma unroll
            for (int j2 = 0; j2 < Q2; ++j2) {
              float s = 0.f;
#pragma unroll
              for (int c = 0; c < 4; ++c) s = fmaf(acc[j0][c], rr[c][j2], s);
              v[j0 * Q2 + j2] = s;
            }
          ReduceScatter<Q0 * Q2, G / 2, 1>::run(v, lane);
          const int base = scatter_base<Q0 * Q2, G / 2, 1>(lane);
          float* dst = a.rowbuf + static_cast<int64_t>(u) * D + j1 * Q2;
#pragma unroll
          for (int i = 0; i < Q0 * Q2 / G; ++i) {
            const int idx = base + i, j0 = idx / Q2, j2 = idx % Q2;
            dst[j0 * Q1 * Q2 + j2] = v[i];
          }
        } else {
          // g_u for the lane's j1: gg[j0][j2] = sum over duplicates of scale * grad_out[bag][j0, j1, j2]
          float gg[Q0][Q2];
#pragma unroll
          for (int j0 = 0; j0 < Q0; ++j0)
#pragma unroll
            for (int j2 = 0; j2 < Q2; ++j2) gg[j0][j2] = 0.f;
          const int i0 = row_start(ui), i1 = row_start(ui + 1);
          for (int i = i0; i < i1; ++i) {
            const float s = __shfl_sync(kAll, i < 32 ? sca : scb, i & 31);
            const int bag = __shfl_sync(kAll, i < 32 ? bga : bgb, i & 31);
            float4 v[Q0];
            if (i - pa < KP) {  // staged (warp-uniform branch)
              const float* go = gos + (i - pa) * D + j1 * Q2;
#pragma unroll
              for (int j0 = 0; j0 < Q0; ++j0) v[j0] = *reinterpret_cast<const float4*>(go + j0 * Q1 * Q2);
            } else {
              const float* go = a.grad_out + static_cast<int64_t>(bag) * D + j1 * Q2;
#pragma unroll
              for (int j0 = 0; j0 < Q0; ++j0) v[j0] = __ldg(reinterpret_cast<const float4*>(go + j0 * Q1 * Q2));
            }
#pragma unroll
            for (int j0 = 0; j0 < Q0; ++j0) {
              gg[j0][0] = fmaf(s, v[j0].x, gg[j0][0]);
              gg[j0][1] = fmaf(s, v[j0].y, gg[j0][1]);
              gg[j0][2] = fmaf(s, v[j0].z, gg[j0][2]);
              gg[j0][3] = fmaf(s, v[j0].w, gg[j0][3]);
            }
          }
          // Y += g R^T (lane-local); X partial = P^T g over the lane's j0.
          float xv[4 * Q2];
#pragma unroll
          for (int c = 0; c < 4; ++c) {
#pragma unroll
            for (int j0 = 0; j0 < Q0; ++j0) {
              float s = y[j0][c];
#pragma unroll
              for (int j2 = 0; j2 < Q2; ++j2) s = fmaf(gg[j0][j2], rr[c][j2], s);
              y[j0][c] = s;
            }
#pragma unroll
            for (int j2 = 0; j2 < Q2; ++j2) {
              float s = 0.f;
#pragma unroll
              for (int j0 = 0; j0 < Q0; ++j0) s = fmaf(acc[j0][c], gg[j0][j2], s);
              xv[c * Q2 + j2] = s;
            }
          }
          ReduceScatter<4 * Q2, 16, G>::run(xv, lane);
          const int base = scatter_base<4 * Q2, 16, G>(lane);
          float* dst = a.xbuf + static_cast<int64_t>(u) * S2 + b0 * Q2;
#pragma unroll
          for (int i = 0; i < 4 * Q2 / Q1; ++i) dst[base + i] = xv[i];
        }
      }
      __syncwarp();  // every lane done with the chunk before the next staging
    }
    if constexpr (BWD) {
      // dT_1 = Y; dT_0 = Y G_1^T (sum over all 128 columns: warp reduce-scatter).
      float* d1 = a.dtbuf1 + static_cast<int64_t>(it) * Q0 * N1 + 4 * lane;
#pragma unroll
      for (int j0 = 0; j0 < Q0; ++j0) {
        *reinterpret_cast<float4*>(d1 + j0 * N1) = make_float4(y[j0][0], y[j0][1], y[j0][2], y[j0][3]);
      }
      float* d0 = a.dtbuf0 + static_cast<int64_t>(it) * S0;
#pragma unroll
      for (int ab = 0; ab < R1; ab += 8) {
        float v[8 * Q0];
#pragma unroll
        for (int al = 0; al < 8; ++al) {
          const float4 bv = __ldg(reinterpret_cast<const float4*>(g1 + (ab + al) * N1) + lane);
#pragma unroll
          for (int j0 = 0; j0 < Q0; ++j0) {
            v[al * Q0 + j0] = fmaf(y[j0][0], bv.x, fmaf(y[j0][1], bv.y, fmaf(y[j0][2], bv.z, y[j0][3] * bv.w)));
          }
        }
        ReduceScatter<8 * Q0, 16, 1>::run(v, lane);
        const int idx = scatter_base<8 * Q0, 16, 1>(lane);
        d0[(idx % Q0) * R1 + ab + idx / Q0] = v[0];
      }
    }
  }
}

}  // namespace cuda_detail
}  // namespace torchrec_tt
