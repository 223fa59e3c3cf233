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
// The tensor-core backward's rows use another layout ("lane-per-b"; R2 == 32): lane l owns
// the columns c R2 + l (b = l, all four j1) of P and Y. Every lane reads the row's whole
// gradient g (summed over the row's duplicates by all lanes, 2 values each, into a per-warp
// buffer); then Y += g R^T and X[b = l][:] = P^T g are lane-local (no reduce-scatter, one
// 16-byte store of X per lane): ~190 instructions per row instead of ~290.
// Memory latency: each warp copies the G_2 slices of up to 8 rows (and, backward, the
// output-gradient rows of their first 16 positions; 4 and 8 in the tensor-core kernels,
// below) to shared memory with asynchronous
// copies, all in flight together; the first batch lands while P is computed. (G_1 slices
// are read through L1: consecutive items share i_1. Copying a block's G_1 slice to shared
// memory instead was slower: benchmarks/NOTES.md, v7c.) The FMA forward also loads its four
// items' metadata up front, one value per lane, and the next item's G_2 digits and T_0 slice
// during the current item (NOTES v19: -5% of its time); the tensor-core backward deals its
// block's items to its warps by their rows (deal_block_items, v22), with their metadata.
// Records written are the ones of the generic item kernel (same layouts), so the
// slice-gradient reductions are shared; but the backward writes no T_0 record (a copy of
// the G_0 slice): the middle core's reduction reads G_0[i_0] from core 0 itself.
//
// Tensor cores (MMA = true; by default in the backward kernel only, TORCHREC_TT_CUDA_MMA in
// tt_embedding_bag_cuda.cu; benchmarks/NOTES.md v8 has the measurements): the four
// items of a warp come in key order, so they nearly always share i_1. Their T_0 slices,
// stacked, are one 16 x R1 operand (rows item * Q0 + j0), and P of all four is one
// (16 x R1) x (R1 x 128) product on `mma.m16n8k8` TF32 instructions; backward, dT_0 of all
// four is one (16 x 128) x (128 x R1) product with the stacked Y. Every operand is split
// into two TF32 parts (x = hi + lo) and A B = A_lo B_hi + A_hi B_lo + A_hi B_hi ("3xTF32",
// the dropped A_lo B_lo is ~2^-22 relative): fp32 accuracy, a fixed order of sums
// (deterministic). With TF32 = true (the backward under torch's TF32 matmul precision,
// tf32_products in tt_embedding_bag_cuda.cu) only A_hi B_hi: one mma per tile, no lo parts
// split, stored or loaded; ~2^-10 relative error per product, still deterministic. Items with
// another i_1 in the same warp take one more product each, with the other items' rows
// discarded. P reaches the per-row code, and Y leaves it, through a per-warp shared-memory
// buffer (16 rows of kPLd floats). A row of a product depends on its row of the stacked
// operand only, so each product stores the rows of its items.
//
// The tensor-core backward also sums core 1's slice gradients (no dT_1 records, no
// reduction launch for core 1): a block of kFusedWarps warps holds 32 consecutive items,
// the reduction chunk of the slice-gradient kernels (tt_embedding_bag_cuda.cu). When its
// warps are done, every run of equal i_1 among them gets sum T_0^T Y (R1 x 128, K = 4
// rows per item) on tensor cores, warp w computing columns 16w..16w+15, and is handled
// like the reduction kernel handles a run of its chunk: finalised (gradient or optimizer
// update, from registers) when it begins and ends in the block, else written as the
// chunk's partial for the tail kernel. Finalising here is safe: only this block's items
// read those G_1 slices, and it has read them all.
#pragma once

#include <cstdint>

#include "tt_cuda_update.cuh"

namespace torchrec_tt {
namespace cuda_detail {

constexpr int kFastItemsPerWarp = 4;
// Warps per block: 4, or in the tensor-core backward (core 1's sums fused, see above) 8, so
// that a block holds one 32-item reduction chunk.
constexpr int kFusedWarps = 8;
constexpr int kFusedItems = kFusedWarps * kFastItemsPerWarp;
constexpr int fast_warps(bool bwd, bool mma) {
  return bwd && mma ? kFusedWarps : 4;
}
// G_2 slices staged per chunk of an item's rows, and output-gradient rows staged per chunk
// (backward); halved in the tensor-core kernels, whose P / Y buffer takes the room.
constexpr int stage_rows(bool mma) {
  return mma ? 4 : 8;
}
constexpr int stage_positions(bool mma) {
  return mma ? 8 : 16;
}

constexpr int kPLd = 132;  // row stride (floats) of the per-warp P / Y buffer: 16-byte rows, conflict-free P stores
constexpr int kTLd = 36;   // row stride of the stacked T_0 slices (conflict-free A-fragment loads)
constexpr int kMmaRows = 16;  // m of mma.m16n8k8: kFastItemsPerWarp items x Q0 rows

// Backward rows in the lane-per-b layout (the tensor-core backward, see the header): a row's
// gradient g (D = 64 floats) in a per-warp buffer that every lane reads whole.
constexpr bool lane_per_b(bool bwd, bool mma) {
  return bwd && mma;
}
// Shared memory of one warp (floats): the P / Y buffer (tensor cores) or the transposed
// T_0 slice, then the staging area, then (lane-per-b backward) the row's g. Seed shapes
// (S2 = 128, D = 64, Q0 * R1 <= 128).
constexpr int fast_warp_floats(bool bwd, bool mma) {
  return (mma ? kMmaRows * kPLd : 128) + stage_rows(mma) * 128 + (bwd ? stage_positions(mma) * 64 : 0) +
      (lane_per_b(bwd, mma) ? 64 : 0);
}

// Blocks per SM for the tensor-core kernels: the backward's shared memory allows 2 x 102 KB
// (8 warps), registers are capped to match (128); the forward's would allow 5 x 42 KB (4
// warps), but 96 registers spill, so 4 (126 registers). The FMA kernels keep the compiler's
// choice (0).
constexpr int fast_min_blocks(bool bwd, bool mma) {
  return mma ? (bwd ? 2 : 4) : 0;
}

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
  float* dtbuf0;  // [items, Q0*R1]
  float* dtbuf1;  // [items, Q0*128] (FMA backward; the tensor-core one sums core 1 itself)
  ReduceArgs<float, float> r1;  // tensor-core backward: core 1's reduction (chunks of kFusedItems)
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

// TF32 tensor-core products (sm_80+), see the header comment. Rounded to nearest: sm_90 has
// an instruction for ties to even (one F2FP), while ties away from zero (cvt.rna) takes three
// integer instructions (an infinity test, an add, a mask); both halve the TF32 ulp.
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm("cvt.rn.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
#else
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
#endif
  return r;
}

struct Tf32Pair {
  uint32_t hi, lo;
};

// x = hi + lo in TF32 parts; with TF32 (one-pass products, see mma_3xtf32) only hi is used.
template <bool TF32>
__device__ __forceinline__ Tf32Pair split_tf32(float x) {
  const uint32_t hi = to_tf32(x);
  if constexpr (TF32) {
    return {hi, 0u};
  } else {
    return {hi, to_tf32(x - __uint_as_float(hi))};
  }
}

// d += A B for one m16n8k8 tile: a = {(g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4)},
// b = {(t, g), (t + 4, g)}, d = {(g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1)} with
// g = lane / 4, t = lane % 4 ((row, column) of A, B and D).
__device__ __forceinline__ void mma_tf32(
    float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// A B to fp32 accuracy, as big + small: big += A_hi B_hi, small += A_lo B_hi + A_hi B_lo
// (two accumulators: shorter chains of dependent mma instructions). With TF32 (torch's
// "high" float32 matmul precision, see tf32_products in tt_embedding_bag_cuda.cu) one pass:
// big += A_hi B_hi, small untouched; relative error ~2^-10 per product instead of ~2^-22.
template <bool TF32>
__device__ __forceinline__ void mma_3xtf32(
    float (&big)[4], float (&small)[4], const Tf32Pair (&a)[4], Tf32Pair b0, Tf32Pair b1) {
  if constexpr (!TF32) mma_tf32(small, a[0].lo, a[1].lo, a[2].lo, a[3].lo, b0.hi, b1.hi);
  mma_tf32(big, a[0].hi, a[1].hi, a[2].hi, a[3].hi, b0.hi, b1.hi);
  if constexpr (!TF32) mma_tf32(small, a[0].hi, a[1].hi, a[2].hi, a[3].hi, b0.lo, b1.lo);
}

// The same in three independent accumulators (no dependent mma instructions in one call):
// big += A_hi B_hi, lo_a += A_lo B_hi, lo_b += A_hi B_lo; the product is big + (lo_a + lo_b).
template <bool TF32>
__device__ __forceinline__ void mma_3xtf32_split(
    float (&big)[4], float (&lo_a)[4], float (&lo_b)[4], const Tf32Pair (&a)[4], Tf32Pair b0, Tf32Pair b1) {
  if constexpr (!TF32) mma_tf32(lo_a, a[0].lo, a[1].lo, a[2].lo, a[3].lo, b0.hi, b1.hi);
  mma_tf32(big, a[0].hi, a[1].hi, a[2].hi, a[3].hi, b0.hi, b1.hi);
  if constexpr (!TF32) mma_tf32(lo_b, a[0].hi, a[1].hi, a[2].hi, a[3].hi, b0.lo, b1.lo);
}

// Position of float4 `f` of a staged G_2 slice: lane l reads float4s 4(l % 8) + c,
// c = 0..3; the XOR spreads the 8 lanes of a quarter-warp over all 8 bank groups.
__device__ __forceinline__ int g2_swizzle(int f) {
  return f ^ ((f >> 3) & 3);
}

// P = T_0 G_1 with the G_1 slice g1 (R1 x N1) for all 16 rows of the stacked operand; the
// rows of the items that use g1 are stored (lo_in: the lane's row g, hi_in: row g + 8) into
// `pys` (a row of the product depends on that row of T_0 only).
// af: the A fragments of the stacked T_0, per k-step of 8. Column map: n-tile 4 ag + q,
// column nn <-> P column 32 ag + 4 nn + q, so a lane's B fragments of four tiles are one
// float4 of G_1 and its results two float4s of a row of P.
template <int R1, int N1, bool TF32>
__device__ __forceinline__ void mma_prefix_product(
    const Tf32Pair (&af)[R1 / 8][4], bool lo_in, bool hi_in, const float* g1, float* pys, int lane) {
  const int g = lane >> 2, t = lane & 3;
  // The B fragments of a column group's first k-step are loaded during the group before (its
  // first product waited on them: long-scoreboard stalls).
  const float* const gl = g1 + t * N1 + 4 * g;
  float4 next0 = __ldg(reinterpret_cast<const float4*>(gl)), next1 = __ldg(reinterpret_cast<const float4*>(gl + 4 * N1));
#pragma unroll 1
  for (int ag = 0; ag < N1 / 32; ++ag) {
    float d[4][4] = {}, e[4][4] = {};
    const float4 first0 = next0, first1 = next1;
    if (ag + 1 < N1 / 32) {
      next0 = __ldg(reinterpret_cast<const float4*>(gl + 32 * (ag + 1)));
      next1 = __ldg(reinterpret_cast<const float4*>(gl + 4 * N1 + 32 * (ag + 1)));
    }
#pragma unroll
    for (int s = 0; s < R1 / 8; ++s) {
      const float4 b0 = s == 0 ? first0 : __ldg(reinterpret_cast<const float4*>(gl + 8 * s * N1 + 32 * ag));
      const float4 b1 = s == 0 ? first1 : __ldg(reinterpret_cast<const float4*>(gl + (8 * s + 4) * N1 + 32 * ag));
      mma_3xtf32<TF32>(d[0], e[0], af[s], split_tf32<TF32>(b0.x), split_tf32<TF32>(b1.x));
      mma_3xtf32<TF32>(d[1], e[1], af[s], split_tf32<TF32>(b0.y), split_tf32<TF32>(b1.y));
      mma_3xtf32<TF32>(d[2], e[2], af[s], split_tf32<TF32>(b0.z), split_tf32<TF32>(b1.z));
      mma_3xtf32<TF32>(d[3], e[3], af[s], split_tf32<TF32>(b0.w), split_tf32<TF32>(b1.w));
    }
    if constexpr (!TF32) {
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int i = 0; i < 4; ++i) d[q][i] += e[q][i];
    }
    if (lo_in) {
      float* row = pys + g * kPLd + 32 * ag + 8 * t;
      *reinterpret_cast<float4*>(row) = make_float4(d[0][0], d[1][0], d[2][0], d[3][0]);
      *reinterpret_cast<float4*>(row + 4) = make_float4(d[0][1], d[1][1], d[2][1], d[3][1]);
    }
    if (hi_in) {
      float* row = pys + (g + 8) * kPLd + 32 * ag + 8 * t;
      *reinterpret_cast<float4*>(row) = make_float4(d[0][2], d[1][2], d[2][2], d[3][2]);
      *reinterpret_cast<float4*>(row + 4) = make_float4(d[0][3], d[1][3], d[2][3], d[3][3]);
    }
  }
}

// dT_0 = Y G_1^T (Y in `pys`, rows as in mma_prefix_product); the kept rows are written to
// dt_lo[r] (row g) and dt_hi[r] (row g + 8), r < R1. K map: k-step 2j (2j + 1), slot t
// and t + 4 <-> columns 16j + 4t + 0 and + 1 (+ 2 and + 3): a lane's fragments of two
// k-steps are one float4 of a Y row and one of a G_1 row.
template <int R1, int N1, bool TF32>
__device__ __forceinline__ void mma_prefix_grad(
    bool lo_in, bool hi_in, const float* g1, const float* pys, float* dt_lo, float* dt_hi, int lane) {
  const int g = lane >> 2, t = lane & 3;
  // accumulators per n-tile: [0] / [1] the k-steps 2j / 2j + 1, big / small parts
  float d[R1 / 8][2][4] = {}, e[R1 / 8][2][4] = {};
  // The first n-tile's B fragments of each step are loaded during the step before (as the
  // P product's first k-step: its products waited on these loads).
  const float* const gl = g1 + g * N1 + 4 * t;
  float4 next = __ldg(reinterpret_cast<const float4*>(gl));
#pragma unroll 2
  for (int j = 0; j < N1 / 16; ++j) {
    const float4 first = next;
    if (j + 1 < N1 / 16) next = __ldg(reinterpret_cast<const float4*>(gl + 16 * (j + 1)));
    const float4 y0 = *reinterpret_cast<const float4*>(pys + g * kPLd + 16 * j + 4 * t);
    const float4 y1 = *reinterpret_cast<const float4*>(pys + (g + 8) * kPLd + 16 * j + 4 * t);
    const Tf32Pair ae[4] = {split_tf32<TF32>(y0.x), split_tf32<TF32>(y1.x), split_tf32<TF32>(y0.y), split_tf32<TF32>(y1.y)};
    const Tf32Pair ao[4] = {split_tf32<TF32>(y0.z), split_tf32<TF32>(y1.z), split_tf32<TF32>(y0.w), split_tf32<TF32>(y1.w)};
#pragma unroll
    for (int nt = 0; nt < R1 / 8; ++nt) {
      const float4 bv = nt == 0 ? first : __ldg(reinterpret_cast<const float4*>(gl + 8 * nt * N1 + 16 * j));
      mma_3xtf32<TF32>(d[nt][0], e[nt][0], ae, split_tf32<TF32>(bv.x), split_tf32<TF32>(bv.y));
      mma_3xtf32<TF32>(d[nt][1], e[nt][1], ao, split_tf32<TF32>(bv.z), split_tf32<TF32>(bv.w));
    }
  }
#pragma unroll
  for (int nt = 0; nt < R1 / 8; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      d[nt][0][i] = TF32 ? d[nt][0][i] + d[nt][1][i] : (d[nt][0][i] + d[nt][1][i]) + (e[nt][0][i] + e[nt][1][i]);
    }
#pragma unroll
  for (int nt = 0; nt < R1 / 8; ++nt) {
    if (lo_in) *reinterpret_cast<float2*>(dt_lo + 8 * nt + 2 * t) = make_float2(d[nt][0][0], d[nt][0][1]);
    if (hi_in) *reinterpret_cast<float2*>(dt_hi + 8 * nt + 2 * t) = make_float2(d[nt][0][2], d[nt][0][3]);
  }
}

// The fused core-1 sums' A operand (T_0^T, R1 = 32 x 16 rows per warp), stored by each warp in
// fragment order, split into TF32 parts: per k-step sl (rows 8 sl .. 8 sl + 7) and part (hi,
// lo), a float4 per m-tile and lane holding that lane's (a0, a1, a2, a3): one conflict-free
// 16-byte load each. Written once per warp, read by all NW warps (no splitting there).
constexpr int kStackFloats = 2 * 2 * 2 * 32 * 4;  // [sl][part][mt][lane][4]

// Where lane's float4 of k-step sl, part (0: hi, 1: lo) and m-tile mt lies in the A stack.
__host__ __device__ constexpr int stack_offset(int sl, int part, int mt, int lane) {
  return ((sl * 2 + part) * 2 + mt) * 128 + 4 * lane;
}
static_assert(stack_offset(2, 0, 0, 0) == kStackFloats, "A stack layout");

// The warp's stack: lane (g, t) loads the 16 values of its fragments straight from core 0
// (k-row 8 sl + 4 u + t is row j0 = t of slot 2 sl + u; columns g, g + 8, g + 16, g + 24).
template <int R1, int S0, bool TF32>
__device__ __forceinline__ void store_t0_stack(const float* c0, int d0_slot, int nslots, float* stack, int lane) {
  const int g = lane >> 2, t = lane & 3;
  float v[4][4];  // [slot][m-column: g, g + 8, g + 16, g + 24]
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int d0 = __shfl_sync(0xffffffffu, d0_slot, i);
    const float* row = c0 + static_cast<int64_t>(d0) * S0 + t * R1 + g;
#pragma unroll
    for (int c = 0; c < 4; ++c) v[i][c] = i < nslots ? __ldg(row + 8 * c) : 0.f;
  }
#pragma unroll
  for (int sl = 0; sl < 2; ++sl)
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      // (a0, a1, a2, a3) = (slot 2sl, col m), (2sl, m + 8), (2sl + 1, m), (2sl + 1, m + 8), m = 16 mt + g
      const Tf32Pair p[4] = {split_tf32<TF32>(v[2 * sl][2 * mt]), split_tf32<TF32>(v[2 * sl][2 * mt + 1]),
                             split_tf32<TF32>(v[2 * sl + 1][2 * mt]), split_tf32<TF32>(v[2 * sl + 1][2 * mt + 1])};
      *reinterpret_cast<uint4*>(stack + stack_offset(sl, 0, mt, lane)) = make_uint4(p[0].hi, p[1].hi, p[2].hi, p[3].hi);
      if constexpr (!TF32) {
        *reinterpret_cast<uint4*>(stack + stack_offset(sl, 1, mt, lane)) = make_uint4(p[0].lo, p[1].lo, p[2].lo, p[3].lo);
      }
    }
}

// Runs of equal values over lanes 0 .. n - 1 (lane's value v, the previous lane's prev): bit i
// of the result marks lane i starting a run. Warp-uniform; every lane must call it.
__device__ __forceinline__ unsigned run_heads(int lane, int n, int v, int prev) {
  return __ballot_sync(0xffffffffu, lane < n && (lane == 0 || v != prev));
}

// The next run [ra, rb) of a run_heads mask whose last run ends at `end`, taken off `heads`;
// false when none is left.
__device__ __forceinline__ bool next_run(unsigned& heads, int end, int& ra, int& rb) {
  if (heads == 0u) return false;
  ra = __ffs(heads) - 1;
  heads &= heads - 1u;
  rb = heads != 0u ? __ffs(heads) - 1 : end;
  return true;
}

// The tensor-core backward's items, dealt to the block's warps by their work so that the warps
// reach the barrier before the core-1 sums together (with four consecutive items per warp, that
// barrier was 10% of the kernel's stall samples: benchmarks/NOTES.md, v22). Every warp ranks the
// block's nb items by their unique rows (a bitonic sort over the lanes, ties by item, so all warps
// agree; positions, ~10 instructions each against ~200 per row, are left out so that the sort
// waits on one round of loads, not two) and takes the ranks w, 15 - w, 16 + w and 31 - w (a snake
// over the ranks); its slots hold them in item order, so runs of equal i_1 stay contiguous slots.
// A block whose items are not all of one i_1 keeps four consecutive items per warp: dealt, most of
// its warps would hold both runs and take two P and two dT_0 products (measured slower).
struct DealtItems {
  int item;    // lane s < n: the block-relative item of slot s (64 for an empty slot)
  int n;       // the warp's items (warp-uniform)
  int urow;    // lane s < n: the item's first unique row
  int pos;     // lane s < n: its first position
  int counts;  // lane s < n: its unique rows << 16 | its positions (each <= 64)
  int d1;      // lane s < n: its i_1 digit
  int d0;      // lane s < n: its i_0 digit
};

__device__ __forceinline__ DealtItems deal_block_items(
    const int32_t* item_urow, const int32_t* urow_start, const int32_t* item_d1, const int32_t* item_d0, int s0, int nb,
    int lane, int wid) {
  constexpr unsigned kAll = 0xffffffffu;
  constexpr int kNone = 64;
  static_assert(kFusedItems == 32 && kFusedWarps == 8 && kFastItemsPerWarp == 4, "a lane per item, 4 rounds");
  const bool valid = lane < nb;
  const int ur = valid ? item_urow[s0 + lane] : 0, ur1 = valid ? item_urow[s0 + lane + 1] : 0;
  const int d1 = valid ? item_d1[s0 + lane] : -1, d0 = valid ? item_d0[s0 + lane] : 0;  // (loads in flight together)
  const int d1_first = __shfl_sync(kAll, d1, 0);  // (every lane: not inside a condition)
  const bool one_run = __all_sync(kAll, !valid || d1 == d1_first);
  const int ps = valid ? urow_start[ur] : 0, ps1 = valid ? urow_start[ur1] : 0;
  const int counts = (ur1 - ur) << 16 | (ps1 - ps);
  int key = valid ? (ur1 - ur) << 5 | (31 - lane) : -1;
#pragma unroll
  for (int k = 2; k <= 32; k <<= 1)  // bitonic sort, descending
#pragma unroll
    for (int j = k >> 1; j > 0; j >>= 1) {
      const int other = __shfl_xor_sync(kAll, key, j);
      key = (((lane & j) == 0) == ((lane & k) == 0)) ? max(key, other) : min(key, other);
    }
  int it[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int kq = __shfl_sync(kAll, key, q % 2 == 0 ? 8 * q + wid : 8 * q + 7 - wid);
    const int c = 4 * wid + q;  // consecutive
    it[q] = one_run ? (kq >= 0 ? 31 - (kq & 31) : kNone) : (c < nb ? c : kNone);
  }
  auto order = [&](int x, int y) {
    const int lo = min(it[x], it[y]);
    it[y] = max(it[x], it[y]);
    it[x] = lo;
  };
  order(0, 1);
  order(2, 3);
  order(0, 2);
  order(1, 3);
  order(1, 2);
  DealtItems d;
  d.n = (it[0] < kNone) + (it[1] < kNone) + (it[2] < kNone) + (it[3] < kNone);
  d.item = lane == 0 ? it[0] : lane == 1 ? it[1] : lane == 2 ? it[2] : lane == 3 ? it[3] : kNone;
  const int src = d.item < kNone ? d.item : 0;
  d.urow = __shfl_sync(kAll, ur, src);
  d.pos = __shfl_sync(kAll, ps, src);
  d.counts = __shfl_sync(kAll, counts, src);
  d.d1 = __shfl_sync(kAll, d1, src);
  d.d0 = __shfl_sync(kAll, d0, src);
  return d;
}

// Core 1's slice gradients from the block's items (tensor-core backward, see the header):
// per run of equal i_1 among the nb items of chunk blk, G = sum T_0^T Y (R1 x N1), then
// finalised or written as a chunk partial. smem: the warps' buffers (WF floats each: Y rows
// [16][kPLd], then the A stack of store_t0_stack); sd1: digits of the items s0 - 1 .. s0 + nb
// (-1 outside the batch); sitem: the block-relative item of each warp's slots (4 w + slot; 64
// when empty: deal_block_items). K map: k-step s = rows 8s..8s+7 = stack slots 2s (slot t) and
// 2s + 1 (slot t + 4); a run sums the k-steps in stack order, its own items' rows only. N map:
// n-tile nt, column nn <-> column 16 w + 2 nn + nt, so a lane's B
// fragments of both tiles are one float2 of a Y row and its results one float4 of each of its
// 4 rows of G.
template <int R1, int N1, int NW, int WF, bool TF32>
__device__ void fused_core1_sums(
    const ReduceArgs<float, float>& r, const float* smem, const int* sd1, const int* sitem, int blk, int nb, float* red,
    int lane, int wid) {
  static_assert(R1 == 32 && N1 == 16 * NW && kMmaRows * kPLd + kStackFloats <= WF, "fused core-1 shapes");
  const int g = lane >> 2, t = lane & 3;
  int off[16];  // the lane's elements of G: rows 16 mt + 8 h + g, columns 16 w + 4 t + c
#pragma unroll
  for (int i = 0; i < 16; ++i) off[i] = (8 * (i / 4) + g) * N1 + 16 * wid + 4 * t + i % 4;
  static_assert(kFusedItems <= 32, "one lane per item of the chunk");
  // Runs of equal i_1 (block-uniform), found by one ballot instead of a scan of dependent
  // shared-memory loads per item.
  unsigned heads = run_heads(lane, nb, sd1[1 + lane], sd1[lane]);  // sd1 holds 34 >= lane + 2 digits
  for (int ra, rb; next_run(heads, nb, ra, rb);) {
    const int dg = sd1[1 + ra];
    float d[2][2][4] = {}, e[2][2][4] = {}, f[2][2][4] = {};
#pragma unroll 2
    for (int s = 0; s < kFusedItems / 2; ++s) {
      const int2 its = *reinterpret_cast<const int2*>(sitem + 2 * s);
      const bool in0 = its.x >= ra && its.x < rb, in1 = its.y >= ra && its.y < rb;  // in the run (uniform)
      if (!(in0 || in1)) continue;
      const float* const ys = smem + (s >> 1) * WF;
      const float* const st = ys + kMmaRows * kPLd;  // the A stack of the warp holding items 2s, 2s + 1
      const int lr = 8 * (s & 1) + t;  // the warp's Y row of slot t; lr + 4: slot t + 4
      Tf32Pair af[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const uint4 hi = *reinterpret_cast<const uint4*>(st + stack_offset(s & 1, 0, mt, lane));
        const uint4 lo = TF32 ? make_uint4(0u, 0u, 0u, 0u)  // one-pass products: no lo part stored
                              : *reinterpret_cast<const uint4*>(st + stack_offset(s & 1, 1, mt, lane));
        af[mt][0] = {hi.x, lo.x};
        af[mt][1] = {hi.y, lo.y};
        af[mt][2] = {hi.z, lo.z};
        af[mt][3] = {hi.w, lo.w};
        if (!(in0 && in1)) {  // a run's first or last k-step: the other item's rows out
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (j < 2 ? !in0 : !in1) af[mt][j] = {0u, 0u};
          }
        }
      }
      const float2 zero = make_float2(0.f, 0.f);
      const float2 y0 = in0 ? *reinterpret_cast<const float2*>(ys + lr * kPLd + 16 * wid + 2 * g) : zero;
      const float2 y1 = in1 ? *reinterpret_cast<const float2*>(ys + (lr + 4) * kPLd + 16 * wid + 2 * g) : zero;
      const Tf32Pair b00 = split_tf32<TF32>(y0.x), b01 = split_tf32<TF32>(y1.x), b10 = split_tf32<TF32>(y0.y), b11 = split_tf32<TF32>(y1.y);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        mma_3xtf32_split<TF32>(d[mt][0], e[mt][0], f[mt][0], af[mt], b00, b01);
        mma_3xtf32_split<TF32>(d[mt][1], e[mt][1], f[mt][1], af[mt], b10, b11);
      }
    }
    float v[16];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int nt = c & 1, i = 2 * h + (c >> 1);  // column 4t + c: tile nt, fragment element i
          v[8 * mt + 4 * h + c] = TF32 ? d[mt][nt][i] : d[mt][nt][i] + (e[mt][nt][i] + f[mt][nt][i]);
        }
    const bool gstart = sd1[ra] != dg, gend = sd1[1 + rb] != dg;
    if (gstart && gend) {
      finalize_held<NW * 32>(r, dg, off, v, red);
    } else {
      float* const dst = (gstart ? r.pl : r.pf) + static_cast<int64_t>(blk) * r.S;
      if (gstart && threadIdx.x == 0) list_crossing_run(r, blk);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        *reinterpret_cast<float4*>(dst + off[4 * q]) = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
      }
    }
  }
}

template <int Q0, int R1, int R2, int Q2, bool BWD, bool MMA, bool TF32>
__global__ void __launch_bounds__(fast_warps(BWD, MMA) * 32, fast_min_blocks(BWD, MMA))
    tt_fast_item_kernel(const FastArgs a) {
  constexpr int N1 = 128;       // q1 * r2
  constexpr int Q1 = N1 / R2;
  constexpr int G = R2 / 4;     // lanes of one j1
  constexpr int D = Q0 * Q1 * Q2;
  constexpr int S0 = Q0 * R1, S1 = R1 * N1, S2 = R2 * Q2;
  static_assert(R1 % 8 == 0 && R1 <= 32 && R2 % 4 == 0 && N1 % R2 == 0 && Q2 == 4 && Q0 == 4, "fast path shapes");
  static_assert((Q0 * Q2) % G == 0 && (4 * Q2) % Q1 == 0, "fast path shapes");
  // staging: a G_2 slice is one float4 per lane, an output-gradient row 16 float4
  static_assert(S2 == 128 && D == 64, "staged fast path shapes");
  constexpr int KR = stage_rows(MMA);
  constexpr int KP = BWD ? stage_positions(MMA) : 0;
  constexpr bool LANE_B = lane_per_b(BWD, MMA);  // backward rows: lane = b (R2 == 32), all four j1
  static_assert(
      KR * S2 + KP * D + (MMA ? kMmaRows * kPLd : R1 * Q0) + (LANE_B ? D : 0) <= fast_warp_floats(BWD, MMA),
      "smem plan");
  static_assert(!LANE_B || (R2 == 32 && Q1 == 4), "lane-per-b shapes");
  static_assert(!MMA || (kFastItemsPerWarp * Q0 == kMmaRows && R1 <= kTLd && N1 % 32 == 0), "tensor-core shapes");
  static_assert(MMA || !TF32, "one-pass TF32 products are tensor-core products");
  constexpr unsigned kAll = 0xffffffffu;
  constexpr int NW = fast_warps(BWD, MMA);
  constexpr bool FUSED = BWD && MMA;  // core 1's sums in this kernel
  extern __shared__ __align__(16) float fast_smem[];
  __shared__ int sd1[FUSED ? kFusedItems + 2 : 1];  // i_1 of the block's items, and of both neighbours
  __shared__ float sred[FUSED ? NW * 32 + 4 : 1];
  __shared__ __align__(8) int sitem[FUSED ? kFusedItems : 2];  // the block-relative item of slot 4 w + s
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  float* const wbuf = fast_smem + wid * fast_warp_floats(BWD, MMA);
  float* const t0s = wbuf;  // FMA path: T_0 transposed [R1][Q0]
  float* const pys = wbuf;  // tensor cores: P, then Y, of the warp's items [16][kPLd]
  float* const g2s = wbuf + (MMA ? kMmaRows * kPLd : R1 * Q0);  // [KR][S2], float4s swizzled (g2_swizzle)
  float* const gos = g2s + KR * S2;   // [KP][D] (backward)
  float* const gbs = gos + KP * D;    // [D]: the current row's g (lane-per-b backward)
  const int nitems = a.counts[0];
  if constexpr (FUSED) {
    static_assert(NW * kFastItemsPerWarp == kFusedItems, "a block is one reduction chunk");
    if (static_cast<int>(blockIdx.x) * kFusedItems >= nitems) return;  // block-uniform
    if (threadIdx.x < kFusedItems + 2) {
      const int i = static_cast<int>(blockIdx.x) * kFusedItems - 1 + threadIdx.x;
      sd1[threadIdx.x] = i >= 0 && i < nitems ? a.item_d1[i] : -1;
    }
  }
  const int it0 = (blockIdx.x * NW + wid) * kFastItemsPerWarp;
  const int s0 = FUSED ? static_cast<int>(blockIdx.x) * kFusedItems : 0;  // the block's first item
  const int nb = FUSED ? min(kFusedItems, nitems - s0) : 0;
  // The warp's items, by slot: it0 + slot, or (tensor-core backward) dealt by their work.
  const DealtItems dealt =
      FUSED ? deal_block_items(a.item_urow, a.urow_start, a.item_d1, a.item_d0, s0, nb, lane, wid) : DealtItems{};
  const int nslots = FUSED ? dealt.n : min(it0 + kFastItemsPerWarp, nitems) - it0;
  const int slot_it = FUSED ? s0 + dealt.item : it0 + lane;  // lane < nslots: slot lane's item
  if constexpr (FUSED) {
    if (lane < kFastItemsPerWarp) sitem[wid * kFastItemsPerWarp + lane] = dealt.item;
  }
  const int j1 = (4 * lane) / R2, b0 = (4 * lane) % R2;
  // tensor cores: the warp's items as slots of the stacked operand, and their i_1 digits
  const int d1_slot = !(MMA && lane < nslots) ? -1 : FUSED ? dealt.d1 : a.item_d1[slot_it];
  const int d0_slot = !(MMA && lane < nslots) ? 0 : FUSED ? dealt.d0 : a.item_d0[slot_it];
  // Per run of equal i_1 among the slots: fn(G_1 slice, lane's row g kept, row g + 8 kept).
  // Bit i of slot_heads: slot i starts a run (tensor cores only).
  const unsigned slot_heads = MMA ? run_heads(lane, nslots, d1_slot, __shfl_up_sync(kAll, d1_slot, 1)) : 0u;
  auto for_each_run = [&](auto&& fn) {
    unsigned heads = slot_heads;
    for (int ra, rb; next_run(heads, nslots, ra, rb);) {
      const int slot_lo = (lane >> 2) / Q0, slot_hi = (8 + (lane >> 2)) / Q0;
      fn(a.c1 + static_cast<int64_t>(__shfl_sync(kAll, d1_slot, ra)) * S1, slot_lo >= ra && slot_lo < rb,
         slot_hi >= ra && slot_hi < rb);
    }
  };
  // FMA forward: the metadata of the warp's items is loaded up front, one value per lane (lane i:
  // item it0 + i; lane nslots: the end of the last item's rows), and each item's G_2 digits
  // during the item before, so no item starts on a chain of two dependent loads (item_urow,
  // then urow_d2). The tensor-core backward has its items' first unique rows and first
  // positions, and their counts, from deal_block_items, so an item's row and position metadata
  // are one round of independent loads (no registers to spare for more). The FMA backward and
  // the tensor-core forward (both off by default) keep their per-item loads.
  constexpr bool PIPE = !BWD && !MMA;
  constexpr bool UR_UP = PIPE || (BWD && MMA);
  const int m_d0 = PIPE && lane < nslots ? a.item_d0[it0 + lane] : 0;
  const int m_d1 = PIPE && lane < nslots ? a.item_d1[it0 + lane] : 0;
  const int m_ur = FUSED ? dealt.urow : PIPE && lane <= nslots && it0 < nitems ? a.item_urow[it0 + lane] : 0;
  // the G_2 digits of the n (<= 64) unique rows from v0 on: lane's row and row lane + 32
  auto load_d2 = [&](int v0, int n, int& x, int& y) {
    x = lane < n ? a.urow_d2[v0 + lane] : 0;
    y = lane + 32 < n ? a.urow_d2[v0 + lane + 32] : 0;
  };
  // the same for item it, from the up-front metadata
  auto load_item_d2 = [&](int s, int& x, int& y) {  // (slot s)
    const int v0 = __shfl_sync(kAll, m_ur, s);
    load_d2(v0, __shfl_sync(kAll, m_ur, s + 1) - v0, x, y);
  };
  int next_d2a = 0, next_d2b = 0;
  // and the item's T_0 slice (lane < R1: column lane of G_0[i_0]), loaded during the item
  // before: the key order puts i_1 most significant, so consecutive items share G_1's slice
  // but not G_0's, and P waits on T_0.
  float next_t0[Q0];
  auto load_t0 = [&](int s) {
    const float* g0n = a.c0 + static_cast<int64_t>(__shfl_sync(kAll, m_d0, s)) * S0;
#pragma unroll
    for (int j0 = 0; j0 < Q0; ++j0) next_t0[j0] = lane < R1 ? __ldg(g0n + j0 * R1 + lane) : 0.f;
  };
  if constexpr (PIPE) {
    if (nslots > 0) {
      load_item_d2(0, next_d2a, next_d2b);
      load_t0(0);
    }
  }
  for (int s_it = 0; s_it < nslots; ++s_it) {
    const int it = FUSED ? __shfl_sync(kAll, slot_it, s_it) : it0 + s_it;
    // G_0[i_0] for the FMA product's T_0 (PIPE: loaded during the item before, load_t0)
    const float* g0 = PIPE ? nullptr : a.c0 + static_cast<int64_t>(a.item_d0[it]) * S0;
    const float* g1 = a.c1 + static_cast<int64_t>(PIPE ? __shfl_sync(kAll, m_d1, s_it) : a.item_d1[it]) * S1;
    const int u0 = UR_UP ? __shfl_sync(kAll, m_ur, s_it) : a.item_urow[it];
    const int cnt = FUSED ? __shfl_sync(kAll, dealt.counts, s_it) : 0;  // rows << 16 | positions
    const int u1 = FUSED ? u0 + (cnt >> 16) : UR_UP ? __shfl_sync(kAll, m_ur, s_it + 1) : a.item_urow[it + 1];
    // Metadata of the item's rows (<= 64) and positions (<= 64), one load per lane,
    // handed around by shuffles: no row waits on a metadata load.
    const int nu = u1 - u0;
    int d2a = next_d2a, d2b = next_d2b;  // PIPE: loaded during the item before
    if constexpr (!PIPE) load_d2(u0, nu, d2a, d2b);
    int sta = 0, stb = 0, bga = 0, bgb = 0, p0 = 0, p1 = 0;
    float sca = 0.f, scb = 0.f;
    if constexpr (BWD) {
      sta = lane < nu ? a.urow_start[u0 + lane] : 0;
      stb = lane + 32 < nu ? a.urow_start[u0 + lane + 32] : 0;
      p0 = FUSED ? __shfl_sync(kAll, dealt.pos, s_it) : __shfl_sync(kAll, sta, 0);
      p1 = FUSED ? p0 + (cnt & 0xffff) : a.urow_start[u1];
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
    if constexpr (PIPE) {
      if (lane < R1) {
#pragma unroll
        for (int j0 = 0; j0 < Q0; ++j0) t0s[lane * Q0 + j0] = next_t0[j0];
      }
      if (s_it + 1 < nslots) {  // lands during this item
        load_item_d2(s_it + 1, next_d2a, next_d2b);
        load_t0(s_it + 1);
      }
    }
    __syncwarp();
    // P = T_0 G_1: acc[j0][c] for the lane's 4 columns, 4 lane + c (lane-per-b: c R2 + lane).
    float acc[Q0][4];
    if constexpr (MMA) {
      if (s_it == 0) {  // P of all the warp's items on tensor cores
        float* const ts = pys;  // stacked T_0 [16][kTLd], read into registers before P is stored
#pragma unroll
        for (int i = 0; i < kFastItemsPerWarp; ++i) {
          const float* g0i = a.c0 + static_cast<int64_t>(__shfl_sync(kAll, d0_slot, i)) * S0;
          if (lane < R1) {
#pragma unroll
            for (int j0 = 0; j0 < Q0; ++j0) {
              ts[(i * Q0 + j0) * kTLd + lane] = i < nslots ? __ldg(g0i + j0 * R1 + lane) : 0.f;
            }
          }
        }
        __syncwarp();
        const int g = lane >> 2, t = lane & 3;
        Tf32Pair af[R1 / 8][4];
#pragma unroll
        for (int s = 0; s < R1 / 8; ++s) {
          af[s][0] = split_tf32<TF32>(ts[g * kTLd + 8 * s + t]);
          af[s][1] = split_tf32<TF32>(ts[(g + 8) * kTLd + 8 * s + t]);
          af[s][2] = split_tf32<TF32>(ts[g * kTLd + 8 * s + t + 4]);
          af[s][3] = split_tf32<TF32>(ts[(g + 8) * kTLd + 8 * s + t + 4]);
        }
        __syncwarp();
        for_each_run([&](const float* g1r, bool lo_in, bool hi_in) {
          mma_prefix_product<R1, N1, TF32>(af, lo_in, hi_in, g1r, pys, lane);
        });
        __syncwarp();
      }
#pragma unroll
      for (int j0 = 0; j0 < Q0; ++j0) {
        const float* const prow = pys + (s_it * Q0 + j0) * kPLd;
        if constexpr (LANE_B) {
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[j0][c] = prow[c * R2 + lane];
        } else {
          const float4 v = *reinterpret_cast<const float4*>(prow + 4 * lane);
          acc[j0][0] = v.x;
          acc[j0][1] = v.y;
          acc[j0][2] = v.z;
          acc[j0][3] = v.w;
        }
      }
    } else {
      if (!PIPE && lane < R1) {  // (PIPE: stored above)
#pragma unroll
        for (int j0 = 0; j0 < Q0; ++j0) {
          t0s[lane * Q0 + j0] = __ldg(g0 + j0 * R1 + lane);
        }
      }
      __syncwarp();
#pragma unroll
      for (int j0 = 0; j0 < Q0; ++j0)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[j0][c] = 0.f;
      // G_1's rows are loaded kAhead rows ahead of their products (a ring of registers): the
      // loads of a plain unrolled loop were issued 4 rows ahead, and the first product of each
      // group waited on them (long-scoreboard stalls, 20% of the FMA forward's samples).
      constexpr int kAhead = 8;
      float4 ring[kAhead];
#pragma unroll
      for (int r = 0; r < kAhead; ++r) ring[r] = __ldg(reinterpret_cast<const float4*>(g1 + r * N1) + lane);
#pragma unroll
      for (int r = 0; r < R1; ++r) {
        const float4 bv = ring[r % kAhead];
        if (r + kAhead < R1) ring[r % kAhead] = __ldg(reinterpret_cast<const float4*>(g1 + (r + kAhead) * N1) + lane);
        const float4 tv = *reinterpret_cast<const float4*>(t0s + r * Q0);
        const float t[4] = {tv.x, tv.y, tv.z, tv.w};
        const float b[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
        for (int j0 = 0; j0 < Q0; ++j0)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[j0][c] = fmaf(t[j0], b[c], acc[j0][c]);
      }
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
        const float* g2 = g2s + (ui - c0) * S2;
        if constexpr (LANE_B) {
          // g_u (summed over the row's positions in input order), 2 of its D values per lane,
          // into the warp's buffer; then every lane reads it whole: Y[j0][c] += g[j0][c][:] .
          // R[lane][:], X[lane][:] = sum over (j0, c) of P[j0][c R2 + lane] g[j0][c][:]. No
          // cross-lane sums.
          float2 gl = make_float2(0.f, 0.f);
          const int i0 = row_start(ui), i1 = row_start(ui + 1);
          for (int i = i0; i < i1; ++i) {
            const float s = __shfl_sync(kAll, i < 32 ? sca : scb, i & 31);
            const int bag = __shfl_sync(kAll, i < 32 ? bga : bgb, i & 31);
            const float2 v = i - pa < KP  // staged (warp-uniform branch)
                ? *reinterpret_cast<const float2*>(gos + (i - pa) * D + 2 * lane)
                : __ldg(reinterpret_cast<const float2*>(a.grad_out + static_cast<int64_t>(bag) * D + 2 * lane));
            gl.x = fmaf(s, v.x, gl.x);
            gl.y = fmaf(s, v.y, gl.y);
          }
          *reinterpret_cast<float2*>(gbs + 2 * lane) = gl;
          __syncwarp();
          const float4 rv = *reinterpret_cast<const float4*>(g2 + 4 * g2_swizzle(lane));
          float xs[2][Q2] = {};  // X over j0 < Q0 / 2 and over the rest (shorter chains)
#pragma unroll
          for (int j0 = 0; j0 < Q0; ++j0)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const float4 gv = *reinterpret_cast<const float4*>(gbs + (j0 * Q1 + c) * Q2);
              y[j0][c] = fmaf(gv.w, rv.w, fmaf(gv.z, rv.z, fmaf(gv.y, rv.y, fmaf(gv.x, rv.x, y[j0][c]))));
              const float p = acc[j0][c];
              float* const x = xs[j0 / (Q0 / 2)];
              x[0] = fmaf(p, gv.x, x[0]);
              x[1] = fmaf(p, gv.y, x[1]);
              x[2] = fmaf(p, gv.z, x[2]);
              x[3] = fmaf(p, gv.w, x[3]);
            }
          __syncwarp();  // every lane has read g before the next row writes it
          *reinterpret_cast<float4*>(a.xbuf + static_cast<int64_t>(u) * S2 + lane * Q2) =
              make_float4(xs[0][0] + xs[1][0], xs[0][1] + xs[1][1], xs[0][2] + xs[1][2], xs[0][3] + xs[1][3]);
          continue;
        }
        float rr[4][Q2];
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
      // dT_1 = Y; dT_0 = Y G_1^T (sum over all 128 columns: tensor cores after the last
      // item, or a warp reduce-scatter here).
      if constexpr (!FUSED) {
        float* d1 = a.dtbuf1 + static_cast<int64_t>(it) * Q0 * N1 + 4 * lane;
#pragma unroll
        for (int j0 = 0; j0 < Q0; ++j0) {
          *reinterpret_cast<float4*>(d1 + j0 * N1) = make_float4(y[j0][0], y[j0][1], y[j0][2], y[j0][3]);
        }
      }
      if constexpr (MMA) {  // Y joins the warp's stacked operand (its P rows are done with)
#pragma unroll
        for (int j0 = 0; j0 < Q0; ++j0) {
          float* const yrow = pys + (s_it * Q0 + j0) * kPLd;
          if constexpr (LANE_B) {
#pragma unroll
            for (int c = 0; c < 4; ++c) yrow[c * R2 + lane] = y[j0][c];
          } else {
            *reinterpret_cast<float4*>(yrow + 4 * lane) = make_float4(y[j0][0], y[j0][1], y[j0][2], y[j0][3]);
          }
        }
      } else {
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
  if constexpr (MMA && BWD) {  // dT_0 of all the warp's items on tensor cores
    __syncwarp();
    const int g = lane >> 2;
    // (its slots' items: slot_it of lanes g / Q0 and (g + 8) / Q0; a slot out of the warp's runs writes nothing)
    const int it_lo = __shfl_sync(kAll, slot_it, g / Q0), it_hi = __shfl_sync(kAll, slot_it, (g + 8) / Q0);
    float* const dt_lo = a.dtbuf0 + static_cast<int64_t>(it_lo) * S0 + (g % Q0) * R1;
    float* const dt_hi = a.dtbuf0 + static_cast<int64_t>(it_hi) * S0 + ((g + 8) % Q0) * R1;
    for_each_run([&](const float* g1r, bool lo_in, bool hi_in) {
      mma_prefix_grad<R1, N1, TF32>(lo_in, hi_in, g1r, pys, dt_lo, dt_hi, lane);
    });
    // the A operand of the core-1 sums into the warp's staging area, which it is done with
    store_t0_stack<R1, S0, TF32>(a.c0, d0_slot, nslots, g2s, lane);
    __syncthreads();
    fused_core1_sums<R1, N1, NW, fast_warp_floats(BWD, MMA), TF32>(
        a.r1, fast_smem, sd1, sitem, blockIdx.x, nb, sred, lane, wid);
  }
}

}  // namespace cuda_detail
}  // namespace torchrec_tt
