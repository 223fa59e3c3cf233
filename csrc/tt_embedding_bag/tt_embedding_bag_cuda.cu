// CUDA kernels of the TT embedding-bag ops (namespace ``torchrec_tt``):
//   tt_embedding_bag_forward, tt_embedding_bag_backward,
//   tt_embedding_bag_backward_fused_, tt_lookup_rows.
// The math is specified by torchrec_tt/ops/reference.py; the schemas live in
// torchrec_tt/ops/_library.py; shape checks are shared with the CPU kernels
// (torchrec_tt/tt_checks.h). benchmarks/NOTES.md has the design and numbers.
//
// Pipeline (every op; no host synchronisation, CUDA-graph capturable):
//   1. prep:   validate ids / offsets on the device (CUDA_KERNEL_ASSERT: a bad id
//              or malformed offsets abort the kernel with a device-side assert),
//              map every id to a sort key (prefix digits, then the last digit).
//   2. sort:   radix sort of (key, position): stable, so duplicates keep their
//              input order (deterministic sums). Eager batches of up to 64 tiles of
//              2048 ids: one cooperative launch does steps 2 and 3 (tt_sort_index_kernel,
//              tt_cuda_grid_sort.cuh); larger ones, and any captured into a CUDA
//              graph, take cub's onesweep sort (sort_pairs), the flags kernel, cub's
//              scan and the index kernel.
//   3. index:  one inclusive scan marks "items" (runs of equal prefix
//              (i_0..i_{d-2}), split every kItemChunk positions) and "urows"
//              (runs of equal id inside an item). Buffers are sized for the worst
//              case, kernels read the counts on the device.
//   4. items:  one block per few items computes the prefix product
//              P = G_0[i_0]...G_{d-2}[i_{d-2}] once (prefix reuse), with the core
//              slices staged in shared memory and kept while consecutive items
//              share them; then every unique row of the item (dedup):
//              forward  row = P G_{d-1}[i_{d-1}]              -> row buffer
//              backward g = sum of its (scaled) output grads; X = P^T g (grad of
//              the last core slice), Y += g G_{d-1}^T, then back-propagates Y
//              through the prefix chain (dT_k) and stores per-item factors.
//   5. forward: pooling per bag in input order (sum / mean / weights).
//      backward: per core, items sorted by that core's digit (stable counting
//              passes, all cores in the same launches: tt_cuda_digit_sort.cuh; the
//              item order already groups core d-2), then a chunked segmented
//              reduction sums T_{k-1}^T dT_k (or X) per unique slice in a fixed
//              order and finalises it once: write the gradient, or apply SGD /
//              Adagrad / row-wise Adagrad in place (only touched slices;
//              tt_cuda_update.cuh). A run that crosses chunks is listed by the
//              chunk where it begins and finished by the tail kernel. The
//              tensor-core fast path sums core 1 inside its backward item kernel
//              (tt_cuda_fast.cuh), chunk by chunk. The digit sorts, and core 1's
//              tail on the fused path, run on a second stream (SideStream).
// No float atomics anywhere: same inputs give the same bits.
// The forward leaves its sorted batch for the backward of the same tensors (step 1-3
// done once per training step). Environment: TORCHREC_TT_CUDA_FAST=0 (generic kernels
// only), TORCHREC_TT_CUDA_REUSE=0 (no forward -> backward reuse), TORCHREC_TT_CUDA_MMA
// (tensor cores in the fast item kernels: bwd (default), fwd, 1 (both) or 0),
// TORCHREC_TT_CUDA_STREAMS=0 (the backward on one stream), TORCHREC_TT_CUDA_SORT_TILE=0
// (cub's own tile in step 2), TORCHREC_TT_CUDA_GRID_SORT=0 (cub's sort for every batch).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/core/GradMode.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <atomic>
#include <climits>
#include <limits>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "torchrec_tt/tt_checks.h"
#include "tt_cuda_common.cuh"
#include "tt_cuda_digit_sort.cuh"
#include "tt_cuda_fast.cuh"
#include "tt_cuda_grid_sort.cuh"
#include "tt_cuda_update.cuh"

namespace torchrec_tt {
namespace {

using namespace cuda_detail;

// Sorted positions per item at most (a long run of one prefix is split).
constexpr int kItemChunk = 64;
// Unique rows handled together in one batched small GEMM.
constexpr int kNU = 8;
// Items staged together in the slice-gradient reduction.
constexpr int kNI = 8;
// Sorted items per block of the slice-gradient reduction.
constexpr int kReduceChunk = 32;
static_assert(kFusedItems == kReduceChunk, "a block of the fused backward item kernel is one reduction chunk");
// Items per block of the item kernels.
constexpr int kItemsPerBlock = 4;
// Device counts of a sorted batch (Batch::counts): TT items, TT unique rows, all unique
// rows (cache hit rows follow the TT ones), hit rows (set by the backward), distinct
// TT ids, hit positions, the backward's runs that cross reduction chunks: those of the
// reduction kernels and those of core 1's sums in the tensor-core item kernel, listed
// apart (two tail launches, see run_backward). A batch serves one backward: the forward's
// batch is taken by it.
enum BatchCount : int {
  kItems = 0,
  kTTRows = 1,
  kRows = 2,
  kHitRows = 3,
  kMissIds = 4,
  kHits = 5,
  kCrossRuns = 6,
  kCrossRunsFused = 7,
  kNumCounts = 8
};

// ------------------------------------------------------------------ kernels

// Item and unique-row heads of sorted position i (key; prev: the key at i - 1, unread
// at i = 0). Keys >= hit_base are cache hits (hit_base + slot, sorted after every TT
// key): they start no item, and their unique rows (runs of one slot, split every
// kItemChunk positions) follow the TT ones.
__device__ __forceinline__ void heads_of(
    int64_t i, uint64_t key, uint64_t prev, uint64_t pl, uint64_t hit_base, bool& item_head, bool& urow_head) {
  item_head = (i == 0) || (i % kItemChunk == 0);
  urow_head = item_head;
  if (i > 0) {
    item_head = item_head || (prev / pl != key / pl);
    urow_head = item_head || prev != key;
  }
  if (key >= hit_base) item_head = false;
}

template <typename index_t>
__global__ void tt_prep_kernel(
    const index_t* __restrict__ indices,
    int64_t nnz,
    const int64_t* __restrict__ offsets,
    int64_t num_bags,
    const TTDims t,
    const int64_t* __restrict__ cache_ids,  // sorted cached ids (null: no cache)
    int64_t cache_size,
    uint64_t hit_base,
    uint64_t* __restrict__ keys,
    int32_t* __restrict__ vals,
    int32_t* __restrict__ bag_of) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < nnz) {
    const int64_t id = static_cast<int64_t>(indices[i]);
    CUDA_KERNEL_ASSERT_MSG(
        id >= 0 && id < t.num_embeddings, "torchrec_tt: an index is out of range [0, num_embeddings)");
    uint64_t key = row_key(id, t);
    if (cache_ids != nullptr) {  // a cached id sorts after every TT key, grouped by its slot
      int64_t lo = 0, hi = cache_size;
      while (lo < hi) {
        const int64_t mid = (lo + hi) >> 1;
        if (cache_ids[mid] < id) {
          lo = mid + 1;
        } else {
          hi = mid;
        }
      }
      if (lo < cache_size && cache_ids[lo] == id) key = hit_base + static_cast<uint64_t>(lo);
    }
    keys[i] = key;
    vals[i] = static_cast<int32_t>(i);
    if (bag_of != nullptr) {
      // The bag of position i: the last b with offsets[b] <= i (empty bags skipped).
      // Searched here, in input order, where the lanes of a warp take the same path,
      // from a first guess that is right for bags of equal size (two loads instead of
      // log2(num_bags) dependent ones).
      int64_t lo = 0, hi = num_bags;  // offsets[lo] <= i < offsets[hi]
      if (num_bags > 0) {
        const int64_t g = i * num_bags / nnz;  // in [0, num_bags)
        if (offsets[g] <= i) {
          lo = g;
          if (offsets[g + 1] > i) hi = g + 1;
        } else {
          hi = g;
        }
      }
      while (hi - lo > 1) {
        const int64_t mid = (lo + hi) >> 1;
        if (offsets[mid] <= i) {
          lo = mid;
        } else {
          hi = mid;
        }
      }
      bag_of[i] = static_cast<int32_t>(lo);
    }
  }
  if (offsets != nullptr && i <= num_bags) {
    const int64_t o = offsets[i];
    if (i == 0) {
      CUDA_KERNEL_ASSERT_MSG(o == 0, "torchrec_tt: offsets[0] must be 0");
    }
    if (i == num_bags) {
      CUDA_KERNEL_ASSERT_MSG(o == nnz, "torchrec_tt: offsets[-1] must equal indices.numel()");
    } else {
      CUDA_KERNEL_ASSERT_MSG(o <= offsets[i + 1], "torchrec_tt: offsets must be non-decreasing");
    }
  }
}

// The counts the index step may leave unwritten (no TT id, no hit) or accumulates.
__device__ __forceinline__ void zero_counts(int32_t* counts) {
  counts[kItems] = 0;
  counts[kTTRows] = 0;
  counts[kHitRows] = 0;
  counts[kMissIds] = 0;
  counts[kHits] = 0;
  counts[kCrossRuns] = 0;
  counts[kCrossRunsFused] = 0;
}

// Item and unique-row heads of sorted position i, packed as the index step scans them:
// (item head << 32) | unique-row head.
__device__ __forceinline__ int64_t head_flags(int64_t i, uint64_t key, uint64_t prev, uint64_t pl, uint64_t hit_base) {
  bool ih, uh;
  heads_of(i, key, prev, pl, hit_base, ih, uh);
  return (static_cast<int64_t>(ih) << 32) | static_cast<int64_t>(uh);
}

__global__ void tt_flags_kernel(
    const uint64_t* __restrict__ skeys, int64_t nnz, uint64_t pl, uint64_t hit_base, int64_t* __restrict__ flags,
    int32_t* __restrict__ counts) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i == 0) zero_counts(counts);
  if (i >= nnz) return;
  flags[i] = head_flags(i, skeys[i], i > 0 ? skeys[i - 1] : 0, pl, hit_base);
}

template <typename acc_t>
struct IndexArgs {
  const uint64_t* skeys;
  const int32_t* svals;
  const int64_t* scan;
  int64_t nnz;
  uint64_t pl;
  uint64_t hit_base;
  int32_t* item_start;  // [max_items + 1]
  int32_t* item_urow;   // [max_items + 1]
  int32_t* urow_start;  // [max_urows + 1]
  int32_t* counts;      // [kNumCounts], partly zeroed by zero_counts
  int32_t* posmap;      // [nnz] input position -> urow (or null)
  // backward: bag and scale of every sorted position (or null)
  const int32_t* bag_of;  // bag of every input position
  const int64_t* offsets;
  int64_t num_bags;
  const acc_t* psw;
  int mean;
  int32_t* sbag;
  acc_t* sscale;
  // digits of every item (prefix cores) and of every unique row (last core)
  TTDims t;
  int32_t* item_dig[kMaxCores];
  int32_t* urow_dig;
};

// The index step at sorted position i < nnz: key = skeys[i], prev / next the keys at
// i - 1 / i + 1 (unread past the ends), l = svals[i] (its input position), sc the
// inclusive scan of head_flags at i.
template <typename acc_t>
__device__ __forceinline__ void index_position(
    const IndexArgs<acc_t>& a, int64_t i, uint64_t key, uint64_t prev, uint64_t next, int32_t l, int64_t sc) {
  bool ih, uh;
  heads_of(i, key, prev, a.pl, a.hit_base, ih, uh);
  const int32_t item = static_cast<int32_t>(sc >> 32) - 1;
  const int32_t urow = static_cast<int32_t>(sc & 0xffffffffLL) - 1;
  const bool hit = key >= a.hit_base;
  if (ih) {
    a.item_start[item] = static_cast<int32_t>(i);
    a.item_urow[item] = urow;
    const uint64_t pre = key / a.pl;
    for (int k = 0; k < a.t.d - 1; ++k) a.item_dig[k][item] = prefix_digit(pre, k, a.t);
  }
  if (uh) {
    a.urow_start[urow] = static_cast<int32_t>(i);
    a.urow_dig[urow] = static_cast<int32_t>(hit ? key - a.hit_base : key % a.pl);  // cache slot of a hit
  }
  const bool next_hit = i + 1 < a.nnz && next >= a.hit_base;
  if (!hit && (i == a.nnz - 1 || next_hit)) {  // the last TT position ends the TT items and rows
    a.counts[kItems] = item + 1;
    a.counts[kTTRows] = urow + 1;
    a.item_start[item + 1] = static_cast<int32_t>(i + 1);
    a.item_urow[item + 1] = urow + 1;
    a.urow_start[urow + 1] = static_cast<int32_t>(i + 1);
  }
  if (hit && (i == 0 || prev < a.hit_base)) {  // the first hit (zero-initialised counts: no TT rows)
    if (i == 0) {
      a.item_start[0] = 0;
      a.item_urow[0] = 0;
    }
    a.counts[kHits] = static_cast<int32_t>(a.nnz - i);
  }
  if (i == a.nnz - 1) {
    a.counts[kRows] = urow + 1;
    a.urow_start[urow + 1] = static_cast<int32_t>(a.nnz);
  }
  if (a.hit_base != ~uint64_t{0}) {  // cached lookup: distinct TT (missed) ids, one integer atomic per warp
    const bool new_id = !hit && (i == 0 || prev != key);
    const unsigned ballot = __ballot_sync(__activemask(), new_id);
    if (new_id && (threadIdx.x & 31) == static_cast<unsigned>(__ffs(ballot) - 1)) atomicAdd(&a.counts[kMissIds], __popc(ballot));
  }
  if (a.posmap != nullptr) a.posmap[l] = urow;
  if (a.sbag != nullptr) {
    const int32_t lo = a.bag_of[l];
    acc_t scale = a.psw != nullptr ? a.psw[l] : acc_t(1);
    if (a.mean) scale = scale * (acc_t(1) / static_cast<acc_t>(a.offsets[lo + 1] - a.offsets[lo]));
    a.sbag[i] = static_cast<int32_t>(lo);
    a.sscale[i] = scale;
  }
}

template <typename acc_t>
__global__ void tt_index_kernel(const IndexArgs<acc_t> a) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.nnz) return;
  index_position(
      a, i, a.skeys[i], i > 0 ? a.skeys[i - 1] : 0, i + 1 < a.nnz ? a.skeys[i + 1] : 0, a.svals[i], a.scan[i]);
}

// Steps 2 and 3 in one cooperative launch (batches of up to kGridSortMaxTiles tiles):
// grid_sort_pairs sorts (keys_in, position) into skeys / svals, then each block scans
// the head flags of its tile (blocked: kGridSortItems consecutive positions per thread),
// publishes the tile's sum, waits for the grid, and runs the index step on its positions
// with the earlier tiles' sum added. hist, tile_sums: scratch (grid_sort_pairs; one per
// tile). The counts are zeroed before the last wait.
template <typename acc_t>
__global__ void __launch_bounds__(kGridSortThreads) tt_sort_index_kernel(
    const uint64_t* keys_in, uint64_t* skeys, int32_t* svals, int passes, int* hist, int64_t* tile_sums,
    const IndexArgs<acc_t> a) {
  namespace cg = cooperative_groups;
  using FlagScan = cub::BlockScan<int64_t, kGridSortThreads>;
  __shared__ GridSortShared s;
  __shared__ typename FlagScan::TempStorage flag_scan;
  __shared__ int64_t earlier_tiles;
  const cg::grid_group grid = cg::this_grid();
  const int n = static_cast<int>(a.nnz);
  grid_sort_pairs(grid, s, keys_in, skeys, svals, n, passes, hist);

  const int64_t first = static_cast<int64_t>(blockIdx.x) * kGridSortTile + threadIdx.x * kGridSortItems;
  uint64_t key[kGridSortItems + 2];  // key[j + 1] is the key at first + j
#pragma unroll
  for (int j = 0; j < kGridSortItems + 2; ++j) {
    const int64_t i = first + j - 1;
    key[j] = i >= 0 && i < n ? __ldcg(skeys + i) : 0;
  }
  int64_t sc[kGridSortItems];
#pragma unroll
  for (int j = 0; j < kGridSortItems; ++j) {
    sc[j] = first + j < n ? head_flags(first + j, key[j + 1], key[j], a.pl, a.hit_base) : 0;
  }
  int64_t tile_sum = 0;
  FlagScan(flag_scan).InclusiveSum(sc, sc, tile_sum);
  if (threadIdx.x == 0) {
    tile_sums[blockIdx.x] = tile_sum;
    if (blockIdx.x == 0) zero_counts(a.counts);
  }
  grid.sync();
  if (threadIdx.x < 32) {  // the sum of the earlier tiles (< kGridSortMaxTiles of them)
    int64_t e = 0;
    for (int b = static_cast<int>(threadIdx.x); b < static_cast<int>(blockIdx.x); b += 32) e += __ldcg(tile_sums + b);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) e += __shfl_xor_sync(0xffffffffu, e, o);
    if (threadIdx.x == 0) earlier_tiles = e;
  }
  __syncthreads();
  // Not unrolled: index_position is large, and eight inlined copies made this kernel ~150 KB
  // of code (instruction-fetch stalls); key / sc are then indexed at run time (local memory).
#pragma unroll 1
  for (int j = 0; j < kGridSortItems; ++j) {
    const int64_t i = first + j;
    if (i < n) index_position(a, i, key[j + 1], key[j], key[j + 2], __ldcg(svals + i), earlier_tiles + sc[j]);
  }
}

// Rows of the cache hits: rowbuf[u] = cache_weight[slot of u] for the hit rows
// u in [counts[kTTRows], counts[kRows]); the lookup added to the cache statistics
// (stats[0] lookups, [1] hits, [2] distinct TT ids; one thread, no atomics).
template <typename scalar_t, typename acc_t>
__global__ void tt_hit_rows_kernel(
    const int32_t* __restrict__ counts,
    const int32_t* __restrict__ urow_dig,
    const scalar_t* __restrict__ cache_weight,
    int D,
    acc_t* __restrict__ rowbuf,
    int64_t* __restrict__ stats,
    int64_t nnz) {
  if (blockIdx.x == 0 && threadIdx.x == 0 && threadIdx.y == 0) {
    stats[0] += nnz;
    stats[1] += counts[kHits];
    stats[2] += counts[kMissIds];
  }
  const int u0 = counts[kTTRows], u1 = counts[kRows];
  for (int u = u0 + static_cast<int>(blockIdx.x * blockDim.y + threadIdx.y); u < u1; u += gridDim.x * blockDim.y) {
    const int64_t src = static_cast<int64_t>(urow_dig[u]) * D, dst = static_cast<int64_t>(u) * D;
    for (int e = threadIdx.x; e < D; e += blockDim.x) rowbuf[dst + e] = static_cast<acc_t>(cache_weight[src + e]);
  }
}

// LFU access counting of a training lookup from its sorted batch: one probe per unique
// row (a run of one id, <= kItemChunk positions) with the run's length as multiplicity;
// ids that find no slot add their count to stats[4].
__global__ void tt_count_kernel(
    const int32_t* __restrict__ counts,
    const int32_t* __restrict__ urow_start,
    const uint64_t* __restrict__ skeys,
    uint64_t hit_base,
    const int64_t* __restrict__ cache_ids,
    const TTDims t,
    unsigned long long* __restrict__ hash_keys,
    unsigned long long* __restrict__ hash_counts,
    int64_t size,
    int64_t max_probes,
    int64_t* __restrict__ stats) {
  const int nrows = counts[kRows];
  for (int u = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); u < nrows; u += gridDim.x * blockDim.x) {
    const int p0 = urow_start[u];
    const uint64_t key = skeys[p0];
    const int64_t id = key >= hit_base ? cache_ids[key - hit_base] : row_of_key(key, t);
    const unsigned long long len = static_cast<unsigned long long>(urow_start[u + 1] - p0);
    if (size == 0 || !lfu_count(hash_keys, hash_counts, size, max_probes, id, len)) {
      atomicAdd(reinterpret_cast<unsigned long long*>(stats + 4), len);
    }
  }
}

// Gradient of every hit row h (the h-th row after the TT rows): the sum, in input order,
// of its positions' scaled output gradients -> hbuf[h], its slot -> hdig[h], their
// number -> counts[kHitRows] (read by the reduction that trains the cached rows).
template <typename acc_t>
__global__ void tt_hit_grad_kernel(
    int32_t* __restrict__ counts,
    const int32_t* __restrict__ urow_start,
    const int32_t* __restrict__ urow_dig,
    const int32_t* __restrict__ sbag,
    const acc_t* __restrict__ sscale,
    const acc_t* __restrict__ grad_out,
    int D,
    acc_t* __restrict__ hbuf,
    int32_t* __restrict__ hdig) {
  const int u0 = counts[kTTRows], nh = counts[kRows] - u0;
  if (blockIdx.x == 0 && threadIdx.x == 0 && threadIdx.y == 0) counts[kHitRows] = nh;
  for (int h = static_cast<int>(blockIdx.x * blockDim.y + threadIdx.y); h < nh; h += gridDim.x * blockDim.y) {
    const int p0 = urow_start[u0 + h], p1 = urow_start[u0 + h + 1];
    for (int e = threadIdx.x; e < D; e += blockDim.x) {
      acc_t s = acc_t(0);
      int q = p0;
      for (; q + 8 <= p1; q += 8) {  // 8 loads in flight, summed in order
        acc_t v[8];
#pragma unroll
        for (int x = 0; x < 8; ++x) v[x] = sscale[q + x] * grad_out[static_cast<int64_t>(sbag[q + x]) * D + e];
#pragma unroll
        for (int x = 0; x < 8; ++x) s += v[x];
      }
      for (; q < p1; ++q) s += sscale[q] * grad_out[static_cast<int64_t>(sbag[q]) * D + e];
      hbuf[static_cast<int64_t>(h) * D + e] = s;
    }
    if (threadIdx.x == 0) hdig[h] = urow_dig[u0 + h];
  }
}

// Shared-memory plan of the item kernels (offsets in acc_t elements).
struct ItemSmem {
  int stage[kMaxCores];   // staged slice of prefix core k: (r_k x n_k)
  int stageT[kMaxCores];  // its transpose (n_k x r_k), backward, k >= 1
  int t0, t1;             // ping-pong buffers of the chain
  int ones;               // T_{-1} = [1]
  int rs, rst;            // last-core slices of kNU rows: (r x q*kNU) and transposed
  int gs;                 // row gradients: (Q x q*kNU)
  int cs;                 // GEMM output
  int y;                  // grad of P: (Q x r)
  int scratch;
  int ldr;                // q_last * kNU
};

template <typename scalar_t, typename acc_t>
struct ItemArgs {
  TTDims t;
  const scalar_t* cores[kMaxCores];
  const uint64_t* skeys;
  const int32_t* item_start;
  const int32_t* item_urow;
  const int32_t* urow_start;
  const int32_t* counts;
  const int32_t* item_dig[kMaxCores];  // prefix digits of each item
  const int32_t* urow_dig;             // last digit of each unique row
  acc_t* rowbuf;            // forward: [max_urows, D]
  const acc_t* grad_out;    // backward: [B, D]
  const int32_t* sbag;
  const acc_t* sscale;
  acc_t* xbuf;              // [max_urows, r_{d-1} q_{d-1}]
  acc_t* tbuf[kMaxCores];   // core k >= 1: T_{k-1} per item, [max_items, Q_k r_k]
  acc_t* dtbuf[kMaxCores];  // core k < d-1: dT_k per item, [max_items, Q_k n_k]
  ItemSmem sm;
};

template <typename scalar_t, typename acc_t, bool BWD>
__global__ void __launch_bounds__(kThreads) tt_item_kernel(const ItemArgs<scalar_t, acc_t> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sm = reinterpret_cast<acc_t*>(smem_raw);
  const TTDims& t = a.t;
  const int tid = threadIdx.x;
  const int L = t.d - 1;
  const int nitems = a.counts[kItems];
  const int it0 = blockIdx.x * kItemsPerBlock;
  if (it0 >= nitems) return;
  const int it1 = min(it0 + kItemsPerBlock, nitems);
  const int Qm = t.Q[L], rl = t.r[L], ql = t.q[L], Sx = t.S[L], D = t.D;
  const int ldr = a.sm.ldr;
  acc_t* const scratch = sm + a.sm.scratch;
  acc_t* const ones = sm + a.sm.ones;
  acc_t* const rs = sm + a.sm.rs;
  acc_t* const rst = sm + a.sm.rst;
  acc_t* const gs = sm + a.sm.gs;
  acc_t* const cs = sm + a.sm.cs;
  acc_t* const y = sm + a.sm.y;
  acc_t* const t0 = sm + a.sm.t0;
  acc_t* const t1 = sm + a.sm.t1;
  if (tid == 0) ones[0] = acc_t(1);
  int staged[kMaxCores];
#pragma unroll
  for (int k = 0; k < kMaxCores; ++k) staged[k] = -1;

  for (int it = it0; it < it1; ++it) {
    // (Re)stage the prefix-core slices this item needs; consecutive items share most.
    bool need = false;
#pragma unroll
    for (int k = 0; k < kMaxCores; ++k) {
      if (k < L && a.item_dig[k][it] != staged[k]) need = true;
    }
    if (need) {
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kMaxCores; ++k) {
        if (k < L) {
          const int dig = a.item_dig[k][it];
          if (dig != staged[k]) {
            const int S = t.S[k], nk = t.n[k], rk = t.r[k];
            const scalar_t* src = a.cores[k] + static_cast<int64_t>(dig) * S;
            acc_t* dst = sm + a.sm.stage[k];
            acc_t* dstT = sm + a.sm.stageT[k];
#pragma unroll 4
            for (int e = tid; e < S; e += kThreads) {
              const acc_t v = static_cast<acc_t>(src[e]);
              dst[e] = v;
              if (BWD && k >= 1) {
                const int ra = e / nk, c = e - ra * nk;
                dstT[c * rk + ra] = v;
              }
            }
            staged[k] = dig;
          }
        }
      }
    }
    __syncthreads();

    // Prefix chain: P = T_{d-2} (Qm x rl).
    const acc_t* T = ones;
    if (L >= 1) {
      T = sm + a.sm.stage[0];
      for (int k = 1; k < L; ++k) {
        if (BWD) {
          const int sz = t.Q[k] * t.r[k];
          acc_t* dst = a.tbuf[k] + static_cast<int64_t>(it) * sz;
          for (int e = tid; e < sz; e += kThreads) dst[e] = T[e];
        }
        acc_t* out = (T == t0) ? t1 : t0;
        block_gemm<acc_t>(t.Q[k], t.n[k], t.r[k], T, t.r[k], 1, sm + a.sm.stage[k], t.n[k], out, t.n[k], false, scratch);
        T = out;
      }
    }
    if (BWD) {
      for (int e = tid; e < Qm * rl; e += kThreads) y[e] = acc_t(0);
    }

    // The unique rows of the item, kNU at a time.
    const int u0 = a.item_urow[it], u1 = a.item_urow[it + 1];
    for (int ub = u0; ub < u1; ub += kNU) {
      const int nb = min(kNU, u1 - ub);
      for (int e = tid; e < nb * Sx; e += kThreads) {
        const int u = e / Sx, rem = e - u * Sx;
        const int b = rem / ql, j = rem - b * ql;
        const int64_t il = a.urow_dig[ub + u];
        const acc_t v = static_cast<acc_t>(a.cores[L][il * Sx + rem]);
        rs[b * ldr + u * ql + j] = v;
        if (BWD) rst[(u * ql + j) * rl + b] = v;
      }
      if (BWD) {
        for (int e = tid; e < nb * D; e += kThreads) {
          const int u = e / D, ee = e - u * D;
          const int m = ee / ql, j = ee - m * ql;
          const int i0 = a.urow_start[ub + u], i1 = a.urow_start[ub + u + 1];
          acc_t s = acc_t(0);
          for (int i = i0; i < i1; ++i) {
            s += a.sscale[i] * a.grad_out[static_cast<int64_t>(a.sbag[i]) * D + ee];
          }
          gs[m * ldr + u * ql + j] = s;
        }
      }
      __syncthreads();
      if (!BWD) {
        block_gemm<acc_t>(Qm, ql * nb, rl, T, rl, 1, rs, ldr, cs, ldr, false, scratch);
        for (int e = tid; e < nb * D; e += kThreads) {
          const int u = e / D, ee = e - u * D;
          const int m = ee / ql, j = ee - m * ql;
          a.rowbuf[static_cast<int64_t>(ub + u) * D + ee] = cs[m * ldr + u * ql + j];
        }
      } else {
        // X_u = P^T g_u: gradient of the last-core slice of this row.
        block_gemm<acc_t>(rl, ql * nb, Qm, T, 1, rl, gs, ldr, cs, ldr, false, scratch);
        for (int e = tid; e < nb * Sx; e += kThreads) {
          const int u = e / Sx, rem = e - u * Sx;
          const int b = rem / ql, j = rem - b * ql;
          a.xbuf[static_cast<int64_t>(ub + u) * Sx + rem] = cs[b * ldr + u * ql + j];
        }
        // Y += g_u R_u^T: gradient of P.
        if (L >= 1) block_gemm<acc_t>(Qm, rl, ql * nb, gs, ldr, 1, rst, rl, y, rl, true, scratch);
      }
      __syncthreads();
    }

    if (BWD && L >= 1) {
      // Back-propagate through the chain: dT_{k-1} = dT_k A_k^T; store dT_k per item.
      const acc_t* dT = y;
      for (int k = L - 1; k >= 0; --k) {
        const int sz = t.Q[k] * t.n[k];
        acc_t* dst = a.dtbuf[k] + static_cast<int64_t>(it) * sz;
        for (int e = tid; e < sz; e += kThreads) dst[e] = dT[e];
        if (k >= 1) {
          acc_t* out = (dT == t0) ? t1 : t0;
          block_gemm<acc_t>(t.Q[k], t.r[k], t.n[k], dT, t.n[k], 1, sm + a.sm.stageT[k], t.r[k], out, t.r[k], false, scratch);
          dT = out;
        }
      }
    }
  }
}

// s += w * v and s *= w for the pooling kernel's accumulators: one acc_t, or a float4 of four
// (float tables with D % 4 == 0: a quarter of the threads and loads, the same sums in the same order).
template <typename acc_t>
__device__ __forceinline__ void pool_axpy(acc_t& s, acc_t w, acc_t v) {
  s += w * v;
}
__device__ __forceinline__ void pool_axpy(float4& s, float w, float4 v) {
  s.x += w * v.x;
  s.y += w * v.y;
  s.z += w * v.z;
  s.w += w * v.w;
}
template <typename acc_t>
__device__ __forceinline__ void pool_scale(acc_t& s, acc_t w) {
  s = s * w;
}
__device__ __forceinline__ void pool_scale(float4& s, float w) {
  s = make_float4(s.x * w, s.y * w, s.z * w, s.w * w);
}

// out[b] = sum over the bag's positions of w * row (mean: / bag size); D counts vec_t elements.
template <typename vec_t, typename out_t, typename acc_t>
__global__ void tt_pool_kernel(
    const vec_t* __restrict__ rowbuf,
    const int32_t* __restrict__ posmap,
    const int64_t* __restrict__ offsets,
    int64_t num_bags,
    int D,
    const acc_t* __restrict__ psw,
    int mean,
    out_t* __restrict__ out) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (b >= num_bags) return;
  const int64_t o0 = offsets[b], o1 = offsets[b + 1];
  for (int e = threadIdx.x; e < D; e += blockDim.x) {
    vec_t s{};
    for (int64_t l = o0; l < o1; ++l) {
      pool_axpy(s, psw != nullptr ? psw[l] : acc_t(1), rowbuf[static_cast<int64_t>(posmap[l]) * D + e]);
    }
    if (mean && o1 > o0) pool_scale(s, acc_t(1) / static_cast<acc_t>(o1 - o0));
    out[b * D + e] = static_cast<out_t>(s);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void tt_gather_kernel(
    const acc_t* __restrict__ rowbuf, const int32_t* __restrict__ posmap, int64_t nnz, int D, scalar_t* __restrict__ out) {
  const int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (l >= nnz) return;
  const int64_t src = static_cast<int64_t>(posmap[l]) * D;
  for (int e = threadIdx.x; e < D; e += blockDim.x) out[l * D + e] = static_cast<scalar_t>(rowbuf[src + e]);
}

// The reductions of every core in one launch: blocks [block0[k], block0[k+1]) serve core k.
template <typename scalar_t, typename acc_t>
struct ReduceLaunch {
  ReduceArgs<scalar_t, acc_t> r[kMaxCores + 1];  // + 1: the cache of a cached op
  int block0[kMaxCores + 2];                     // reduction kernels
  int ncores;
  const int2* cross;                             // tail kernel: the listed runs
  const int32_t* ncross;
};

// v[u] = src[x0 + u * stride] (0 past S): the U loads of a thread, issued together.
template <int U, typename acc_t>
__device__ __forceinline__ void load_unrolled(acc_t (&v)[U], const acc_t* src, int x0, int stride, int S) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int x = x0 + u * stride;
    v[u] = x < S ? src[x] : acc_t(0);
  }
}

// Copies nb (<= kNI) rows of sz elements, row r from src + rows[r] * sz, into dst
// (contiguous). All loads of a thread are issued before its stores: one memory
// latency per call instead of one per element.
template <typename acc_t>
__device__ __forceinline__ void stage_rows(acc_t* dst, const acc_t* __restrict__ src, int sz, const int* rows, int nb) {
  if constexpr (sizeof(acc_t) == 4) {
    if ((sz & 3) == 0) {
      const int v = sz >> 2;
      for (int x = threadIdx.x; x < v; x += kThreads) {
        float4 buf[kNI];
#pragma unroll
        for (int r = 0; r < kNI; ++r) {
          if (r < nb) buf[r] = reinterpret_cast<const float4*>(src + static_cast<int64_t>(rows[r]) * sz)[x];
        }
#pragma unroll
        for (int r = 0; r < kNI; ++r) {
          if (r < nb) reinterpret_cast<float4*>(dst + r * sz)[x] = buf[r];
        }
      }
      return;
    }
  }
  for (int x = threadIdx.x; x < sz; x += kThreads) {
    acc_t buf[kNI];
#pragma unroll
    for (int r = 0; r < kNI; ++r) {
      if (r < nb) buf[r] = src[static_cast<int64_t>(rows[r]) * sz + x];
    }
#pragma unroll
    for (int r = 0; r < kNI; ++r) {
      if (r < nb) dst[r * sz + x] = buf[r];
    }
  }
}

// acc (32 x 128, shared memory) = sum over the items of T^T (32 x Q) dT (Q x 128), for
// the middle core of the seed shapes (r_k = 32, n_k = 128, float; kThreads = 128).
// kNI items at a time are staged in shared memory with all their loads in flight, then
// warp w accumulates rows 8w..8w+7 and lane l columns 4l..4l+3 in registers (32 sums;
// the generic path keeps the sums in shared memory and re-reads them every kNI items).
// Items, then q, in order: deterministic.
template <typename scalar_t, typename acc_t>
__device__ void reduce_t_32x128(
    const ReduceArgs<scalar_t, acc_t>& a, const int* items, const int* trows, int count, acc_t* acc, acc_t* ts,
    acc_t* dts) {
  static_assert(kThreads == 128, "4 warps x 8 rows");
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int Q = a.Q;
  float r[8][4];
#pragma unroll
  for (int ra = 0; ra < 8; ++ra)
#pragma unroll
    for (int c = 0; c < 4; ++c) r[ra][c] = 0.f;
  for (int i0 = 0; i0 < count; i0 += kNI) {
    const int nb = min(kNI, count - i0);
    stage_rows<acc_t>(ts, a.tbuf, Q * 32, trows + i0, nb);
    stage_rows<acc_t>(dts, a.dtbuf, Q * 128, items + i0, nb);
    __syncthreads();
    for (int j = 0; j < nb * Q; ++j) {  // j = item * Q + q
      const float4 d = *reinterpret_cast<const float4*>(dts + j * 128 + 4 * lane);
      const float4 t0 = *reinterpret_cast<const float4*>(ts + j * 32 + 8 * w);
      const float4 t1 = *reinterpret_cast<const float4*>(ts + j * 32 + 8 * w + 4);
      const float t[8] = {t0.x, t0.y, t0.z, t0.w, t1.x, t1.y, t1.z, t1.w};
#pragma unroll
      for (int ra = 0; ra < 8; ++ra) {
        r[ra][0] = fmaf(t[ra], d.x, r[ra][0]);
        r[ra][1] = fmaf(t[ra], d.y, r[ra][1]);
        r[ra][2] = fmaf(t[ra], d.z, r[ra][2]);
        r[ra][3] = fmaf(t[ra], d.w, r[ra][3]);
      }
    }
    __syncthreads();  // before the next items overwrite the staging buffers
  }
#pragma unroll
  for (int ra = 0; ra < 8; ++ra) {
    *reinterpret_cast<float4*>(acc + (8 * w + ra) * 128 + 4 * lane) = make_float4(r[ra][0], r[ra][1], r[ra][2], r[ra][3]);
  }
}

// What a reduction kernel instantiation sums per slice (one launch per kind).
enum ReduceKind : int { kPlainSum = 0, kGemmT = 1, kFastT = 2, kNumReduceKinds = 3 };
// Blocks per SM the register-tiled T^T dT sums are compiled for: 6 caps them at 80
// registers (24 warps per SM instead of 16 at 128; a few bytes spill), 3-4% faster steps.
constexpr int kFastTMinBlocks = 6;

// MIN_BLOCKS = 0: no minimum (the compiler's register choice).
template <typename scalar_t, typename acc_t, int KIND, int MIN_BLOCKS = 0>
__global__ void __launch_bounds__(kThreads, MIN_BLOCKS) tt_reduce_kernel(const __grid_constant__ ReduceLaunch<scalar_t, acc_t> m) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sm = reinterpret_cast<acc_t*>(smem_raw);
  // digits[s0 - 1 .. s1] and the items of the chunk, loaded once (no serial global loads)
  __shared__ int sdig[kReduceChunk + 2];
  __shared__ int sitem[kReduceChunk];
  __shared__ int strow[KIND == kPlainSum ? 1 : kReduceChunk];  // the row of tbuf with the item's T
  int blk = 0;
  const ReduceArgs<scalar_t, acc_t>& a = m.r[part_of_block(m.block0, m.ncores, &blk)];
  const int n = *a.count;
  const int s0 = blk * kReduceChunk;
  if (s0 >= n) return;
  const int s1 = min(s0 + kReduceChunk, n);
  const int tid = threadIdx.x;
  if (tid < kReduceChunk + 2) {
    const int i = s0 - 1 + tid;
    sdig[tid] = (i >= 0 && i < n && i <= s1) ? a.digits[i] : -1;
    if (tid >= 1 && i < s1) {
      const int item = a.perm != nullptr ? a.perm[i] : i;
      sitem[tid - 1] = item;
      if constexpr (KIND != kPlainSum) strow[tid - 1] = a.tdig != nullptr ? a.tdig[item] : item;
    }
  }
  __syncthreads();
  const int* dig = sdig + 1 - s0;  // dig[i] for i in [s0 - 1, s1]
  acc_t* const acc = sm + a.sm_acc;
  acc_t* const red = sm + a.sm_red;
  int pos = s0;
  while (pos < s1) {
    const int dg = dig[pos];
    int e = pos + 1;
    while (e < s1 && dig[e] == dg) ++e;
    const bool gstart = pos == 0 || dig[pos - 1] != dg;
    const bool gend = e == n || dig[e] != dg;
    if constexpr (KIND == kPlainSum) {
      for (int x = tid; x < a.S; x += kThreads) {
        acc_t s = acc_t(0);
        int i = pos;
        for (; i + 8 <= e; i += 8) {  // 8 loads in flight, summed in order
          acc_t v[8];
#pragma unroll
          for (int u = 0; u < 8; ++u) v[u] = a.dtbuf[static_cast<int64_t>(sitem[i + u - s0]) * a.S + x];
#pragma unroll
          for (int u = 0; u < 8; ++u) s += v[u];
        }
        for (; i < e; ++i) s += a.dtbuf[static_cast<int64_t>(sitem[i - s0]) * a.S + x];
        acc[x] = s;
      }
    } else if constexpr (KIND == kFastT) {
      if constexpr (std::is_same_v<acc_t, float>) {
        reduce_t_32x128(a, sitem + (pos - s0), strow + (pos - s0), e - pos, acc, sm + a.sm_ts, sm + a.sm_dts);
      }
    } else {
      for (int x = tid; x < a.S; x += kThreads) acc[x] = acc_t(0);
      const int tsz = a.Q * a.rk, dsz = a.Q * a.nk;
      acc_t* const ts = sm + a.sm_ts;
      acc_t* const dts = sm + a.sm_dts;
      for (int i0 = pos; i0 < e; i0 += kNI) {
        const int nb = min(kNI, e - i0);
        stage_rows<acc_t>(ts, a.tbuf, tsz, strow + (i0 - s0), nb);
        stage_rows<acc_t>(dts, a.dtbuf, dsz, sitem + (i0 - s0), nb);
        __syncthreads();
        // acc (r_k x n_k) += sum_items T^T (r_k x Q) dT (Q x n_k)
        block_gemm<acc_t>(a.rk, a.nk, nb * a.Q, ts, 1, a.rk, dts, a.nk, acc, a.nk, true, sm + a.sm_scratch);
      }
    }
    __syncthreads();
    if (gstart && gend) {
      finalize_slice(a, dg, acc, red);
    } else {
      acc_t* dst = (gstart ? a.pl : a.pf) + static_cast<int64_t>(blk) * a.S;
      for (int x = tid; x < a.S; x += kThreads) dst[x] = acc[x];
      if (gstart && tid == 0) list_crossing_run(a, blk);
    }
    __syncthreads();
    pos = e;
  }
}

// Runs that cross chunk boundaries, listed by the kernel that wrote their first partial
// (chunk j): the partials of the run's chunks summed in chunk order, then the slice
// finalised. kTailParts blocks per listed run, each summing and finalising every
// kTailParts-th group of kThreads elements (a middle-core slice of 4096: 8 per thread, all
// of a chunk's loads in flight): the partials are read from DRAM, and one block per run
// had too few bytes in flight (~1 TB/s, 29 us per step at B = 4096). Row-wise Adagrad needs
// the whole slice's norm: one block, through shared memory. Blocks past the list return at once.
constexpr int kTailParts = 4;
constexpr int kTailUnroll = 8;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) tt_reduce_tail_kernel(const __grid_constant__ ReduceLaunch<scalar_t, acc_t> m) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sm = reinterpret_cast<acc_t*>(smem_raw);
  __shared__ int s_end;
  const int entry = static_cast<int>(blockIdx.x) / kTailParts, part = static_cast<int>(blockIdx.x) % kTailParts;
  if (entry >= *m.ncross) return;
  const int2 run = m.cross[entry];
  const ReduceArgs<scalar_t, acc_t>& a = m.r[run.x];
  const bool whole = a.mode == kRowwiseAdagrad;
  const int first = whole ? 0 : part * kThreads;  // the part's first element
  const int stride = whole ? kThreads : kThreads * kTailParts;
  if ((whole && part > 0) || first >= a.S) return;
  const int j = run.y;
  const int n = *a.count;
  const int dg = a.digits[(j + 1) * kReduceChunk - 1];  // the run's digit: it fills the chunk's end
  const int tid = threadIdx.x;
  if (tid == 0) s_end = INT_MAX;
  __syncthreads();
  // The first chunk after j whose first item has another digit (or the end): found in parallel.
  const int nchunks = (n + kReduceChunk - 1) / kReduceChunk;
  for (int base = j + 1; base < nchunks; base += kThreads) {
    const int jj = base + tid;
    if (jj < nchunks && a.digits[jj * kReduceChunk] != dg) atomicMin(&s_end, jj);
    if (__syncthreads_or(s_end != INT_MAX)) break;
  }
  __syncthreads();
  const int jend = min(s_end, nchunks);
  acc_t* const acc = sm + a.sm_acc;
  const int64_t base = static_cast<int64_t>(dg) * a.S;
  for (int x0 = first + tid; x0 < a.S; x0 += stride * kTailUnroll) {
    acc_t s[kTailUnroll];
    load_unrolled(s, a.pl + static_cast<int64_t>(j) * a.S, x0, stride, a.S);
    for (int jj = j + 1; jj < jend; ++jj) {
      acc_t v[kTailUnroll];
      load_unrolled(v, a.pf + static_cast<int64_t>(jj) * a.S, x0, stride, a.S);
#pragma unroll
      for (int u = 0; u < kTailUnroll; ++u) s[u] += v[u];
    }
    int off[kTailUnroll];
    int cnt = 0;  // elements of this group inside the slice (a prefix of u)
#pragma unroll
    for (int u = 0; u < kTailUnroll; ++u) {
      off[u] = x0 + u * stride;
      if (off[u] < a.S) cnt = u + 1;
    }
    if (whole) {
#pragma unroll
      for (int u = 0; u < kTailUnroll; ++u) {
        if (u < cnt) acc[off[u]] = s[u];
      }
    } else if (a.mode == kWriteGrad) {
#pragma unroll
      for (int u = 0; u < kTailUnroll; ++u) {
        if (u < cnt) a.grad[base + off[u]] = static_cast<scalar_t>(s[u]);
      }
    } else {
      update_elements<kTailUnroll>(a, base, off, s, cnt, acc_t(1));
    }
  }
  if (whole) {
    __syncthreads();
    finalize_slice(a, dg, acc, sm + a.sm_red);
  }
}

// ------------------------------------------------------------------ host side

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline unsigned grid_1d(int64_t n, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, ceil_div(n, threads)));
}

int bits_for(uint64_t max_value) {
  int bits = 1;
  while (bits < 64 && (max_value >> bits) != 0) ++bits;
  return bits;
}

TTDims make_dims(
    const char* op, c10::IntArrayRef p, c10::IntArrayRef q, c10::IntArrayRef ranks, int64_t num_embeddings) {
  const int64_t d = static_cast<int64_t>(p.size());
  TORCH_CHECK_VALUE(d <= kMaxCores, op, ": the CUDA kernels support at most ", kMaxCores, " cores, got ", d);
  TTDims t{};
  t.d = static_cast<int>(d);
  t.num_embeddings = num_embeddings;
  const int64_t int_max = std::numeric_limits<int32_t>::max();
  int64_t Q = 1, kw = 1;
  for (int64_t k = 0; k < d; ++k) {
    t.p[k] = static_cast<int>(p[k]);
    t.q[k] = static_cast<int>(q[k]);
    t.Q[k] = static_cast<int>(Q);
    const int64_t n = q[k] * ranks[k + 1], S = ranks[k] * n;
    TORCH_CHECK_VALUE(
        p[k] <= int_max && S <= (int64_t{1} << 24) && Q * q[k] <= (int64_t{1} << 24), op,
        ": core ", k, " is too large for the CUDA kernels");
    t.n[k] = static_cast<int>(n);
    t.S[k] = static_cast<int>(S);
    t.kw[k] = kw;
    if (k < d - 1) kw *= p[k];
    Q *= q[k];
  }
  t.Q[d] = static_cast<int>(Q);
  t.D = static_cast<int>(Q);
  for (int64_t k = 0; k <= d; ++k) t.r[k] = static_cast<int>(ranks[k]);
  const int64_t rows = detail::saturating_prod(p);
  TORCH_CHECK_VALUE(rows < (int64_t{1} << 62), op, ": prod(p_shapes)=", rows, " is too large for the CUDA kernels");
  int64_t st = 1;
  for (int64_t k = d - 1; k >= 0; --k) {
    t.pst[k] = st;
    st *= p[k];
  }
  return t;
}

// A non-negative per-device value, computed once per device (up to 64 devices; past them,
// every call). The cache holds value + 1: 0 means not computed yet.
template <typename Compute>
int per_device(std::atomic<int> (&cache)[64], int device, const Compute& compute) {
  const int held = device < 64 ? cache[device].load() : 0;
  if (held > 0) return held - 1;
  const int v = compute();
  if (device < 64) cache[device] = v + 1;
  return v;
}

int max_dynamic_smem(int device) {
  static std::atomic<int> cache[64];
  return per_device(cache, device, [device] {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    return v;
  });
}

template <typename Kernel>
void prepare_smem(const char* op, Kernel kernel, size_t bytes, int device) {
  TORCH_CHECK_VALUE(
      bytes <= static_cast<size_t>(max_dynamic_smem(device)), op, ": the TT shapes need ", bytes,
      " bytes of shared memory per block, more than the device offers (", max_dynamic_smem(device),
      "); use smaller ranks / q_shapes");
  if (bytes <= 48 * 1024) return;
  // Raised once per kernel, device and size (keeps the call out of CUDA-graph captures after warm-up).
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> done;
  const std::lock_guard<std::mutex> lock(mu);
  size_t& have = done[{reinterpret_cast<const void*>(kernel), device}];
  if (bytes > have) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    have = bytes;
  }
}

struct SmemPlan {
  int64_t off = 0;
  int take(int64_t n) {
    const int64_t o = off;
    off += ceil_div(std::max<int64_t>(n, 1), 4) * 4;
    TORCH_CHECK_VALUE(off < (int64_t{1} << 30), "torchrec_tt: shared-memory plan overflow");
    return static_cast<int>(o);
  }
};

ItemSmem plan_items(const TTDims& t, bool bwd, int64_t* elems) {
  ItemSmem s{};
  SmemPlan p;
  const int L = t.d - 1;
  for (int k = 0; k < L; ++k) {
    s.stage[k] = p.take(t.S[k]);
    s.stageT[k] = (bwd && k >= 1) ? p.take(t.S[k]) : 0;
  }
  int64_t tmax = 1;
  for (int j = 0; j < L; ++j) tmax = std::max<int64_t>(tmax, int64_t{t.Q[j + 1]} * t.r[j + 1]);
  s.t0 = p.take(tmax);
  s.t1 = p.take(tmax);
  s.ones = p.take(1);
  const int64_t Qm = t.Q[L], rl = t.r[L];
  s.ldr = t.q[L] * kNU;
  s.rs = p.take(rl * s.ldr);
  s.rst = bwd ? p.take(rl * s.ldr) : 0;
  s.gs = bwd ? p.take(Qm * s.ldr) : 0;
  s.y = bwd ? p.take(Qm * rl) : 0;
  s.cs = p.take(std::max(Qm, rl) * s.ldr);
  s.scratch = p.take(kGemmScratch);
  *elems = p.off;
  return s;
}

// Device buffers planned on the host and carved out of one allocation: a step
// makes two caching-allocator calls (batch, backward scratch) instead of ~35.
class Arena {
 public:
  template <typename T>
  void add(T** ptr, int64_t n) {
    add_bytes(reinterpret_cast<void**>(ptr), static_cast<size_t>(std::max<int64_t>(n, 0)) * sizeof(T));
  }
  void add_bytes(void** ptr, size_t n) {
    bytes_ = (bytes_ + 255) / 256 * 256;
    slots_.emplace_back(ptr, bytes_);
    bytes_ += n;
  }
  // Allocates the buffer on the device of `like` and fills every registered pointer.
  at::Tensor allocate(const at::TensorOptions& like) {
    at::Tensor buf = at::empty({static_cast<int64_t>(std::max<size_t>(bytes_, 1))}, like.dtype(at::kByte));
    char* base = static_cast<char*>(buf.mutable_data_ptr());
    for (const auto& s : slots_) *s.first = base + s.second;
    return buf;
  }

 private:
  std::vector<std::pair<void**, size_t>> slots_;
  size_t bytes_ = 0;
};

// Sorted view of one batch of ids (steps 1-3 of the pipeline). `ws` owns every buffer.
struct Batch {
  int64_t nnz = 0, max_items = 0, max_urows = 0;
  uint64_t hit_base = ~uint64_t{0};  // sort keys >= hit_base are cache hits (hit_base + slot)
  at::Tensor ws;
  uint64_t* skeys = nullptr;
  int32_t* item_start = nullptr;  // [max_items + 1]
  int32_t* item_urow = nullptr;   // [max_items + 1]
  int32_t* urow_start = nullptr;  // [max_urows + 1]
  int32_t* counts = nullptr;      // [kNumCounts] (BatchCount)
  int32_t* posmap = nullptr;      // [nnz] input position -> unique row (forward)
  int32_t* sbag = nullptr;        // [nnz] bag of every sorted position (backward)
  void* sscale = nullptr;         // [nnz] acc_t scale of every sorted position (backward)
  int32_t* item_dig[kMaxCores] = {};  // per prefix core: digit of each item
  int32_t* urow_dig = nullptr;        // last digit of each unique row
};

// An on/off environment switch of the kernels: on unless set to "0".
bool env_switch_on(const char* name) {
  const char* e = std::getenv(name);
  return !(e != nullptr && std::strcmp(e, "0") == 0);
}

// Tensor cores in the fast kernels (tt_cuda_fast.cuh), TORCHREC_TT_CUDA_MMA: bwd (the default):
// the backward item kernel only; fwd: the forward only; 1: both; 0: neither (FMA kernels).
// The forward is faster without them (benchmarks/NOTES.md, v8; with one-pass TF32 products
// no faster, v17). Bit 1: forward, bit 2: backward.
int mma_mode() {
  const char* e = std::getenv("TORCHREC_TT_CUDA_MMA");
  if (e == nullptr || std::strcmp(e, "bwd") == 0) return 2;
  if (std::strcmp(e, "1") == 0) return 3;
  if (std::strcmp(e, "0") == 0) return 0;
  if (std::strcmp(e, "fwd") == 0) return 1;
  TORCH_CHECK_VALUE(false, "TORCHREC_TT_CUDA_MMA must be 0, 1, fwd or bwd, got '", e, "'");
}

// The kernels' environment switches, read once per process (the tests set them per
// subprocess); every on/off one is on unless set to "0".
struct KernelSwitches {
  // the fast warp-per-item kernels for seed-like shapes (fast_path_ok); 0: the generic ones
  bool fast = env_switch_on("TORCHREC_TT_CUDA_FAST");
  int mma = mma_mode();  // TORCHREC_TT_CUDA_MMA, see mma_mode
  // the forward leaves its sorted batch for the backward of the same tensors
  bool reuse = env_switch_on("TORCHREC_TT_CUDA_REUSE");
  // the backward's second stream (SideStream); 0: all on the caller's stream
  bool streams = env_switch_on("TORCHREC_TT_CUDA_STREAMS");
  // cub's sort with a smaller tile up to kSmallSortMax keys (sort_pairs); 0: cub's own tile
  bool sort_tile = env_switch_on("TORCHREC_TT_CUDA_SORT_TILE");
  // steps 2-3 of batches up to kGridSortMaxTiles tiles in one launch (grid_sort_fits); 0: cub's path
  bool grid_sort = env_switch_on("TORCHREC_TT_CUDA_GRID_SORT");
};

const KernelSwitches& switches() {
  static const KernelSwitches s;
  return s;
}

// Step 2's sort of a batch's (key, position) pairs: cub's onesweep radix sort, with a
// smaller tile than cub's sm_90 tuning for inputs up to kSmallSortMax keys. cub's tile
// (384 threads x 30 pairs of a 64-bit key and a 32-bit value) gives a batch of 82k ids 7
// blocks per pass (and one of 10k ids one block); 256 threads x 8 pairs give it 40 (5).
// Measured on an H100 at B = 4096 x 20: 7.8 against 9.3 us per pass; tiles of 256 x 4
// pairs gave 9.1. At 328k ids (B = 16384 x 20) cub's tile was 1-2% faster per step, hence
// the limit (benchmarks/NOTES.md, v14). Everything else is cub's sm_90 tuning.
// TORCHREC_TT_CUDA_SORT_TILE=0 keeps cub's tile at every size.
constexpr int kSmallSortMax = 1 << 17;

template <typename KeyT, typename ValueT, typename OffsetT>
struct SmallTileSortPolicyHub {
  using Hub = cub::detail::radix::policy_hub<KeyT, ValueT, OffsetT>;
  struct Policy : Hub::Policy900 {
    using OnesweepPolicy = cub::AgentRadixSortOnesweepPolicy<
        256, 8, typename Hub::DominantT, 1, cub::RADIX_RANK_MATCH_EARLY_COUNTS_ANY, cub::BLOCK_SCAN_RAKING_MEMOIZE,
        cub::RADIX_SORT_STORE_DIRECT, Hub::Policy900::ONESWEEP_RADIX_BITS>;
    using ActivePolicy = Policy;  // the only policy (the extension is built for sm_90)
    template <typename FunctorT>
    CUB_RUNTIME_FUNCTION static cudaError_t Invoke(int /*ptx_version*/, FunctorT& op) {
      return op.template Invoke<Policy>();
    }
  };
  using MaxPolicy = Policy;
};

// cub::DeviceRadixSort::SortPairs of n pairs on bits [0, end_bit) (temp == nullptr: sets
// temp_bytes only), with the small tile where it applies.
cudaError_t sort_pairs(
    void* temp, size_t& temp_bytes, const uint64_t* keys_in, uint64_t* keys_out, const int32_t* vals_in,
    int32_t* vals_out, int n, int end_bit, cudaStream_t stream) {
  if (n > kSmallSortMax || !switches().sort_tile) {
    return cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, vals_in, vals_out, n, 0, end_bit, stream);
  }
  using OffsetT = cub::detail::choose_offset_t<int>;
  cub::DoubleBuffer<uint64_t> keys(const_cast<uint64_t*>(keys_in), keys_out);
  cub::DoubleBuffer<int32_t> vals(const_cast<int32_t*>(vals_in), vals_out);
  return cub::DispatchRadixSort<
      cub::SortOrder::Ascending, uint64_t, int32_t, OffsetT, cub::detail::identity_decomposer_t,
      SmallTileSortPolicyHub<uint64_t, int32_t, OffsetT>>::
      Dispatch(temp, temp_bytes, keys, vals, static_cast<OffsetT>(n), 0, end_bit, false, stream);
}

// Whether stream is capturing work into a CUDA graph.
bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// Whether steps 2 and 3 of a batch of n ids run as one tt_sort_index_kernel launch: up to
// kGridSortMaxTiles tiles, all resident on the device at once (cooperative launch), launched
// eagerly (not captured into a CUDA graph), unless TORCHREC_TT_CUDA_GRID_SORT=0. Other
// batches take cub's sort, the flags kernel, cub's scan and the index kernel. Those take
// ~10 us less GPU time per step (benchmarks/NOTES.md section 6, item 0), which is all a
// graph replay pays for; eagerly, the one launch saves more than that in launch gaps.
template <typename acc_t>
bool grid_sort_fits(int64_t n, cudaStream_t stream) {
  if (!switches().grid_sort || n > int64_t{kGridSortTile} * kGridSortMaxTiles || capturing(stream)) return false;
  static std::atomic<int> resident[64];  // blocks resident at once, per device
  const int device = c10::cuda::current_device();
  const int blocks = per_device(resident, device, [device] {
    int per_sm = 0, sms = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, tt_sort_index_kernel<acc_t>, kGridSortThreads, 0));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return per_sm * sms;
  });
  return ceil_div(n, kGridSortTile) <= blocks;
}

template <typename acc_t>
Batch build_batch(
    const TTDims& t,
    c10::IntArrayRef p_shapes,
    const at::Tensor& indices,
    const at::Tensor& offsets64,  // undefined for tt_lookup_rows
    const at::Tensor& psw,        // acc dtype or undefined
    int64_t pooling_mode,
    bool want_posmap,
    bool want_bag,
    cudaStream_t stream,
    const at::Tensor& cache_ids = at::Tensor()) {  // sorted cached ids: hits sort after the TT ids
  Batch bt;
  const int64_t nnz = indices.numel();
  const int64_t num_bags = offsets64.defined() ? offsets64.numel() - 1 : -1;
  bt.nnz = nnz;
  const int L = t.d - 1;
  const uint64_t pl = static_cast<uint64_t>(t.p[L]);
  int64_t prefix_space = 1;
  for (int k = 0; k < L; ++k) prefix_space = std::min<int64_t>(prefix_space * p_shapes[k], int64_t{1} << 40);
  const int64_t chunks = ceil_div(nnz, kItemChunk);
  bt.max_items = std::min<int64_t>(nnz, prefix_space + chunks);
  bt.max_urows = std::min<int64_t>(nnz, t.num_embeddings + chunks);
  const int n = static_cast<int>(nnz);
  const int64_t key_space = detail::saturating_prod(p_shapes);
  const int64_t cache_size = cache_ids.defined() ? cache_ids.numel() : 0;
  TORCH_CHECK_VALUE(
      !cache_ids.defined() || key_space < (int64_t{1} << 62), "torchrec_tt: prod(p_shapes) is too large for a cached lookup");
  const uint64_t hit_base = cache_ids.defined() ? static_cast<uint64_t>(key_space) : std::numeric_limits<uint64_t>::max();
  const int end_bit = bits_for(static_cast<uint64_t>(key_space + cache_size - 1));
  bt.hit_base = hit_base;

  // Scratch of steps 1-3 (freed on return) and the batch itself (kept for the backward).
  uint64_t* keys = nullptr;
  int32_t *vals = nullptr, *svals = nullptr, *bag_of = nullptr;
  int64_t *flags = nullptr, *scan = nullptr;
  void* temp = nullptr;
  size_t sort_bytes = 0, scan_bytes = 0;
  const bool one_launch = nnz > 0 && grid_sort_fits<acc_t>(nnz, stream);
  const int tiles = static_cast<int>(ceil_div(nnz, kGridSortTile));
  int passes = static_cast<int>(ceil_div(end_bit, kGridSortBits));
  int* hist = nullptr;
  int64_t* tile_sums = nullptr;
  if (nnz > 0 && !one_launch) {
    C10_CUDA_CHECK(sort_pairs(nullptr, sort_bytes, nullptr, nullptr, nullptr, nullptr, n, end_bit, stream));
    C10_CUDA_CHECK(cub::DeviceScan::InclusiveSum(
        nullptr, scan_bytes, static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr), n, stream));
  }
  Arena scratch;
  scratch.add(&keys, nnz);
  scratch.add(&vals, nnz);
  scratch.add(&svals, nnz);
  if (want_bag) scratch.add(&bag_of, nnz);
  if (one_launch) {
    scratch.add(&hist, int64_t{passes} * tiles * kGridSortDigits);
    scratch.add(&tile_sums, tiles);
  } else {
    scratch.add(&flags, nnz);
    scratch.add(&scan, nnz);
    scratch.add_bytes(&temp, std::max(sort_bytes, scan_bytes));
  }
  const at::Tensor scratch_buf = scratch.allocate(indices.options());
  {
    const int64_t m = std::max<int64_t>(nnz, num_bags + 1);
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "tt_prep_cuda", [&] {
      tt_prep_kernel<index_t><<<grid_1d(m, 256), 256, 0, stream>>>(
          indices.const_data_ptr<index_t>(), nnz, offsets64.defined() ? offsets64.const_data_ptr<int64_t>() : nullptr,
          num_bags, t, cache_size > 0 ? cache_ids.const_data_ptr<int64_t>() : nullptr, cache_size, hit_base, keys, vals,
          want_bag ? bag_of : nullptr);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (nnz == 0) return bt;

  Arena keep;
  keep.add(&bt.skeys, nnz);
  keep.add(&bt.item_start, bt.max_items + 1);
  keep.add(&bt.item_urow, bt.max_items + 1);
  keep.add(&bt.urow_start, bt.max_urows + 1);
  keep.add(&bt.counts, kNumCounts);
  for (int k = 0; k < L; ++k) keep.add(&bt.item_dig[k], bt.max_items);
  keep.add(&bt.urow_dig, bt.max_urows);
  if (want_posmap) keep.add(&bt.posmap, nnz);
  if (want_bag) {
    keep.add(&bt.sbag, nnz);
    keep.add_bytes(&bt.sscale, static_cast<size_t>(nnz) * sizeof(acc_t));
  }
  bt.ws = keep.allocate(indices.options());

  IndexArgs<acc_t> ia{};
  ia.skeys = bt.skeys;
  ia.svals = svals;
  ia.scan = scan;
  ia.nnz = nnz;
  ia.pl = pl;
  ia.hit_base = hit_base;
  ia.item_start = bt.item_start;
  ia.item_urow = bt.item_urow;
  ia.urow_start = bt.urow_start;
  ia.counts = bt.counts;
  ia.t = t;
  for (int k = 0; k < L; ++k) ia.item_dig[k] = bt.item_dig[k];
  ia.urow_dig = bt.urow_dig;
  ia.posmap = bt.posmap;
  if (want_bag) {
    ia.bag_of = bag_of;
    ia.offsets = offsets64.const_data_ptr<int64_t>();
    ia.num_bags = num_bags;
    ia.psw = psw.defined() ? psw.const_data_ptr<acc_t>() : nullptr;
    ia.mean = pooling_mode == static_cast<int64_t>(PoolingMode::MEAN) ? 1 : 0;
    ia.sbag = bt.sbag;
    ia.sscale = static_cast<acc_t*>(bt.sscale);
  }
  if (one_launch) {
    void* args[] = {&keys, &bt.skeys, &svals, &passes, &hist, &tile_sums, &ia};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(
        reinterpret_cast<const void*>(&tt_sort_index_kernel<acc_t>), dim3(tiles), dim3(kGridSortThreads), args, 0,
        stream));
    return bt;
  }
  C10_CUDA_CHECK(sort_pairs(temp, sort_bytes, keys, bt.skeys, vals, svals, n, end_bit, stream));
  tt_flags_kernel<<<grid_1d(nnz, 256), 256, 0, stream>>>(bt.skeys, nnz, pl, hit_base, flags, bt.counts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  C10_CUDA_CHECK(cub::DeviceScan::InclusiveSum(temp, scan_bytes, flags, scan, n, stream));
  tt_index_kernel<acc_t><<<grid_1d(nnz, 256), 256, 0, stream>>>(ia);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return bt;
}

// ------------------------------------------------------------------ forward -> backward reuse
// The forward op leaves its sorted batch (steps 1-3) in a thread-local slot; the
// backward op of the same ids, offsets and weights (same tensors, same version
// counters, same shapes) takes it instead of sorting again, and empties the slot.
// Any mismatch (another batch, an in-place change that bumped a version, inference
// tensors without version counters) just recomputes it.
struct BatchKey {
  const void* idx_impl = nullptr;
  const void* idx_data = nullptr;
  int64_t idx_ver = -1, nnz = 0;
  const void* off_impl = nullptr;
  const void* off_data = nullptr;
  int64_t off_ver = -1, num_bags = 0;
  const void* w_impl = nullptr;
  int64_t w_ver = -1;
  const void* cache_impl = nullptr;  // the cached ids the batch was split by (cached ops)
  int64_t cache_ver = -1;
  int64_t mode = 0, num_embeddings = 0;
  std::vector<int64_t> p;
  int device = -1;
  int acc = -1;
  int stream = 0;
  bool operator==(const BatchKey& o) const {
    return idx_impl == o.idx_impl && idx_data == o.idx_data && idx_ver == o.idx_ver && nnz == o.nnz &&
        off_impl == o.off_impl && off_data == o.off_data && off_ver == o.off_ver && num_bags == o.num_bags &&
        w_impl == o.w_impl && w_ver == o.w_ver && cache_impl == o.cache_impl && cache_ver == o.cache_ver &&
        mode == o.mode && num_embeddings == o.num_embeddings && p == o.p &&
        device == o.device && acc == o.acc && stream == o.stream;
  }
};

bool batch_key(
    BatchKey* k,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& psw,
    int64_t mode,
    int64_t num_embeddings,
    c10::IntArrayRef p,
    at::ScalarType acc,
    const at::Tensor& cache_ids = at::Tensor()) {
  const bool has_w = psw.has_value() && psw->defined();
  if (indices.is_inference() || offsets.is_inference() || (has_w && psw->is_inference())) return false;
  if (cache_ids.defined()) {
    if (cache_ids.is_inference()) return false;
    k->cache_impl = cache_ids.unsafeGetTensorImpl();
    k->cache_ver = static_cast<int64_t>(cache_ids._version());
  }
  k->idx_impl = indices.unsafeGetTensorImpl();
  k->idx_data = indices.const_data_ptr();
  k->idx_ver = static_cast<int64_t>(indices._version());
  k->nnz = indices.numel();
  k->off_impl = offsets.unsafeGetTensorImpl();
  k->off_data = offsets.const_data_ptr();
  k->off_ver = static_cast<int64_t>(offsets._version());
  k->num_bags = offsets.numel() - 1;
  if (has_w) {
    k->w_impl = psw->unsafeGetTensorImpl();
    k->w_ver = static_cast<int64_t>(psw->_version());
  }
  k->mode = mode;
  k->num_embeddings = num_embeddings;
  k->p = p.vec();
  k->device = indices.get_device();
  k->acc = static_cast<int>(acc);
  k->stream = static_cast<int>(c10::cuda::getCurrentCUDAStream().id() & 0x7fffffff);
  return true;
}

// Sorted batches left by forwards, for the backwards of the same tensors. Process-wide:
// autograd runs a CUDA backward on its device thread, not on the thread of the forward.
// At most kMaxCachedBatches (oldest dropped): a forward that is never followed by its
// backward (evaluation with grad enabled) holds its batch until pushed out.
constexpr size_t kMaxCachedBatches = 32;

struct CachedBatch {
  BatchKey key;
  Batch batch;
  // The keyed tensors stay alive while cached, so no other tensor can take their
  // addresses (TensorImpl and storage) and match the key by accident.
  at::Tensor idx, off, w, cache_ids;
};

class BatchCache {
 public:
  void put(CachedBatch entry) {
    const std::lock_guard<std::mutex> lock(mu_);
    if (entries_.size() >= kMaxCachedBatches) entries_.erase(entries_.begin());
    entries_.push_back(std::move(entry));
  }
  // Takes the entry of `key` (newest first); false if there is none.
  bool take(const BatchKey& key, Batch* out) {
    const std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.rbegin(); it != entries_.rend(); ++it) {
      if (it->key == key) {
        *out = std::move(it->batch);
        entries_.erase(std::next(it).base());
        return true;
      }
    }
    return false;
  }

 private:
  std::mutex mu_;
  std::vector<CachedBatch> entries_;
};

BatchCache& batch_cache() {
  static BatchCache* cache = new BatchCache();  // never destroyed: no CUDA frees at exit
  return *cache;
}

// A second stream for the backward (run_backward): step 5's digit sorts read only the
// batch, so they run beside the item kernel, and core 1's tail on the tensor-core path
// needs only the item kernel, so it runs beside the reductions. Events order the two
// streams (under CUDA graph capture they become the graph's edges); the host never waits.
// The caller's stream waits for all of the side stream's work before the op returns
// (join(), or the destructor if an error left early), so the scratch and the batch, freed
// on the caller's stream, outlive every use of them. Disabled
// (TORCHREC_TT_CUDA_STREAMS=0), the side stream is the caller's and every event is skipped.
class SideStream {
 public:
  SideStream(cudaStream_t main, int device) : main_(main), side_(main) {
    if (!switches().streams) return;
    side_ = at::cuda::getStreamFromPool(false, static_cast<c10::DeviceIndex>(device)).stream();
    thread_local std::map<int, std::array<cudaEvent_t, 3>> events;  // per device, never destroyed
    auto it = events.find(device);
    if (it == events.end()) {
      std::array<cudaEvent_t, 3> ev{};
      for (cudaEvent_t& e : ev) C10_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      it = events.emplace(device, ev).first;
    }
    ev_ = it->second.data();
  }
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;
  ~SideStream() {
    if (side_ != main_ && !joined_) {  // an error left run_backward early: no error checks here
      (void)cudaEventRecord(ev_[kJoin], side_);
      (void)cudaStreamWaitEvent(main_, ev_[kJoin], 0);
    }
  }
  cudaStream_t stream() const { return side_; }
  // The side stream waits for the work queued on the caller's stream so far.
  void wait_for_main() const {
    if (side_ == main_) return;
    C10_CUDA_CHECK(cudaEventRecord(ev_[kFork], main_));
    C10_CUDA_CHECK(cudaStreamWaitEvent(side_, ev_[kFork], 0));
  }
  // Marks the side stream's work queued so far ...
  void mark_sorted() const {
    if (side_ != main_) C10_CUDA_CHECK(cudaEventRecord(ev_[kSorted], side_));
  }
  // ... and the caller's stream waits for that mark.
  void main_waits_sorted() const {
    if (side_ != main_) C10_CUDA_CHECK(cudaStreamWaitEvent(main_, ev_[kSorted], 0));
  }
  // The caller's stream waits for all the work queued on the side stream.
  void join() {
    if (side_ == main_) return;
    C10_CUDA_CHECK(cudaEventRecord(ev_[kJoin], side_));
    C10_CUDA_CHECK(cudaStreamWaitEvent(main_, ev_[kJoin], 0));
    joined_ = true;
  }

 private:
  static constexpr int kFork = 0, kSorted = 1, kJoin = 2;
  cudaStream_t main_, side_;
  cudaEvent_t* ev_ = nullptr;
  bool joined_ = false;
};

template <typename scalar_t, typename acc_t>
ItemArgs<scalar_t, acc_t> item_args(const TTDims& t, const std::vector<at::Tensor>& cores, const Batch& bt) {
  ItemArgs<scalar_t, acc_t> a{};
  a.t = t;
  for (int k = 0; k < t.d; ++k) a.cores[k] = cores[k].const_data_ptr<scalar_t>();
  a.skeys = bt.skeys;
  a.item_start = bt.item_start;
  a.item_urow = bt.item_urow;
  a.urow_start = bt.urow_start;
  a.counts = bt.counts;
  for (int k = 0; k + 1 < t.d; ++k) a.item_dig[k] = bt.item_dig[k];
  a.urow_dig = bt.urow_dig;
  return a;
}

// The fast warp-per-item kernels (tt_cuda_fast.cuh) serve 3-core float32 tables with
// q_0 = q_2 = 4, r_1 = r_2 = 32, q_1 = 4 (the seed shapes) whose cores (and `grad_out`, the
// backward's output gradient) are 16-byte aligned (float4 loads); others take the generic
// block kernels. TORCHREC_TT_CUDA_FAST=0 forces the generic ones.
bool fast_path_ok(const TTDims& t, const std::vector<at::Tensor>& cores, const void* grad_out = nullptr) {
  if (!switches().fast || cores[0].scalar_type() != at::kFloat || t.d != 3) return false;
  if (!(t.q[0] == 4 && t.r[1] == 32 && t.q[1] == 4 && t.r[2] == 32 && t.q[2] == 4)) return false;
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return aligned(cores[0].const_data_ptr()) && aligned(cores[1].const_data_ptr()) &&
      aligned(cores[2].const_data_ptr()) && aligned(grad_out);
}

FastArgs fast_args(const std::vector<at::Tensor>& cores, const Batch& bt) {
  FastArgs f{};
  f.c0 = cores[0].const_data_ptr<float>();
  f.c1 = cores[1].const_data_ptr<float>();
  f.c2 = cores[2].const_data_ptr<float>();
  f.counts = bt.counts;
  f.item_urow = bt.item_urow;
  f.urow_start = bt.urow_start;
  f.item_d0 = bt.item_dig[0];
  f.item_d1 = bt.item_dig[1];
  f.urow_d2 = bt.urow_dig;
  return f;
}

// Whether the fast backward kernel's tensor-core products may be one-pass TF32 (relative error
// ~2^-10 per product) instead of fp32-accurate 3xTF32: torch's float32 matmul precision, as for
// its own cuBLAS matmuls (torch.set_float32_matmul_precision("high") or
// torch.backends.cuda.matmul.fp32_precision = "tf32"; not inside at::NoTF32Guard). The forward
// keeps fp32-accurate products (on tensor cores too, TORCHREC_TT_CUDA_MMA=fwd): one pass made its
// kernel no faster (benchmarks/NOTES.md, v17), and lookups stay exact to fp32 rounding.
// torch >= 2.10 reads the setting per backend (its legacy getter, allowTF32CuBLAS, raises once
// only the new API has set it); older releases have the legacy one only.
bool tf32_products() {
  if (at::NoTF32Guard::should_disable_tf32()) return false;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
      at::Float32Precision::TF32;
#else
  return at::globalContext().allowTF32CuBLAS();
#endif
}

// Whether the fast backward (bwd) or forward item kernel runs on tensor cores (mma_mode).
bool fast_mma(bool bwd) {
  return (switches().mma & (bwd ? 2 : 1)) != 0;
}

template <bool BWD>
void launch_fast_items(const char* op, const FastArgs& f, int64_t max_items, int device, cudaStream_t stream) {
  auto launch = [&](auto kernel, bool mma) {
    const int warps = fast_warps(BWD, mma);
    const size_t bytes = sizeof(float) * warps * fast_warp_floats(BWD, mma);
    prepare_smem(op, kernel, bytes, device);
    kernel<<<grid_1d(max_items, warps * kFastItemsPerWarp), warps * 32, bytes, stream>>>(f);
  };
  if (!fast_mma(BWD)) {
    launch(tt_fast_item_kernel<4, 32, 32, 4, BWD, false, false>, false);
  } else if (BWD && tf32_products()) {  // one-pass TF32 products: the backward only
    launch(tt_fast_item_kernel<4, 32, 32, 4, BWD, true, BWD>, true);
  } else {
    launch(tt_fast_item_kernel<4, 32, 32, 4, BWD, true, false>, true);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The unique rows of a batch, computed by the forward item kernel: [max_urows, D] in acc dtype.
template <typename scalar_t, typename acc_t>
at::Tensor compute_rows(const char* op, const TTDims& t, const std::vector<at::Tensor>& cores, const Batch& bt, cudaStream_t stream) {
  at::Tensor rowbuf = at::empty({bt.max_urows, t.D}, cores[0].options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (fast_path_ok(t, cores)) {
      FastArgs f = fast_args(cores, bt);
      f.rowbuf = rowbuf.mutable_data_ptr<float>();
      launch_fast_items<false>(op, f, bt.max_items, cores[0].get_device(), stream);
      return rowbuf;
    }
  }
  auto a = item_args<scalar_t, acc_t>(t, cores, bt);
  a.rowbuf = rowbuf.mutable_data_ptr<acc_t>();
  int64_t elems = 0;
  a.sm = plan_items(t, false, &elems);
  const size_t bytes = static_cast<size_t>(elems) * sizeof(acc_t);
  auto kernel = tt_item_kernel<scalar_t, acc_t, false>;
  prepare_smem(op, kernel, bytes, cores[0].get_device());
  kernel<<<grid_1d(bt.max_items, kItemsPerBlock), kThreads, bytes, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return rowbuf;
}

dim3 rows_block(int D) {
  const int bx = D >= 128 ? 128 : static_cast<int>(ceil_div(D, 32) * 32);
  return dim3(bx, std::max(1, 256 / bx));
}

std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& x : ts) out.push_back(x.contiguous());
  return out;
}

void check_device(const char* op, const char* name, const at::Tensor& x, const at::Tensor& core0) {
  TORCH_CHECK_VALUE(
      x.device() == core0.device(), op, ": ", name, " is on ", x.device(), " but the cores are on ", core0.device());
}

void check_sizes(const char* op, int64_t nnz) {
  TORCH_CHECK_VALUE(
      nnz < std::numeric_limits<int32_t>::max(), op, ": the CUDA kernels take fewer than 2^31 - 1 indices, got ", nnz);
}

at::Tensor weights_as(const std::optional<at::Tensor>& w, at::ScalarType acc) {
  if (!w.has_value() || !w->defined()) return at::Tensor();
  return w->to(acc).contiguous();
}

// ------------------------------------------------------------------ ops

// The cache of a cached op: sorted int64 ids and their (C, D) rows, beside the cores.
void check_cache(const char* op, const at::Tensor& cache_ids, const at::Tensor& cache_weight, const at::Tensor& core0, int64_t D) {
  TORCH_CHECK_VALUE(
      cache_ids.dim() == 1 && cache_ids.scalar_type() == at::kLong && cache_ids.numel() >= 1, op,
      ": cache_ids must be a non-empty 1-D int64 tensor, got ", cache_ids.scalar_type(), " of shape ", cache_ids.sizes());
  TORCH_CHECK_VALUE(
      cache_weight.dim() == 2 && cache_weight.size(0) == cache_ids.numel() && cache_weight.size(1) == D, op,
      ": cache_weight must be (", cache_ids.numel(), ", ", D, ") (cache_ids.numel(), embedding dim), got ",
      cache_weight.sizes());
  TORCH_CHECK_VALUE(
      cache_weight.scalar_type() == core0.scalar_type(), op, ": cache_weight is ", cache_weight.scalar_type(),
      " but the cores are ", core0.scalar_type());
  check_device(op, "cache_ids", cache_ids, core0);
  check_device(op, "cache_weight", cache_weight, core0);
}

// The cache of a cached lookup and what the lookup updates in place: the statistics and,
// when `count`, the LFU access counts (see torchrec_tt.ops.tt_cached_embedding_bag).
struct CacheLookup {
  at::Tensor ids, weight;                    // sorted cached ids, their (C, D) rows
  at::Tensor hash_keys, hash_counts, stats;  // int64 frequency table; int64 counters (>= 5)
  int64_t max_probes = 1;
  bool count = false;
};

void check_counting(const char* op, const CacheLookup& c, const at::Tensor& core0) {
  TORCH_CHECK_VALUE(
      c.hash_keys.scalar_type() == at::kLong && c.hash_counts.scalar_type() == at::kLong && c.hash_keys.dim() == 1 &&
          c.hash_keys.sizes() == c.hash_counts.sizes() && c.hash_keys.is_contiguous() && c.hash_counts.is_contiguous(),
      op, ": hash_keys and hash_counts must be contiguous 1-D int64 tensors of one shape");
  TORCH_CHECK_VALUE(
      c.stats.dim() == 1 && c.stats.scalar_type() == at::kLong && c.stats.numel() >= 5 && c.stats.is_contiguous(), op,
      ": stats must be a 1-D int64 tensor of >= 5 counters, got ", c.stats.scalar_type(), " of shape ", c.stats.sizes());
  TORCH_CHECK_VALUE(c.max_probes >= 1, op, ": max_probes must be >= 1, got ", c.max_probes);
  check_device(op, "hash_keys", c.hash_keys, core0);
  check_device(op, "hash_counts", c.hash_counts, core0);
  check_device(op, "stats", c.stats, core0);
}

// Pooled lookup; with a cache, the ids found in it are served by its rows.
at::Tensor run_forward(
    const char* op,
    at::TensorList cores_in,
    const at::Tensor& indices_in,
    const at::Tensor& offsets_in,
    const std::optional<at::Tensor>& per_sample_weights,
    c10::IntArrayRef p_shapes,
    c10::IntArrayRef q_shapes,
    c10::IntArrayRef ranks,
    int64_t num_embeddings,
    int64_t pooling_mode,
    const CacheLookup* cache = nullptr) {
  check_tt_args(op, cores_in, p_shapes, q_shapes, ranks, num_embeddings);
  check_bag_shapes(op, indices_in, offsets_in, per_sample_weights, pooling_mode);
  check_device(op, "indices", indices_in, cores_in[0]);
  check_device(op, "offsets", offsets_in, cores_in[0]);
  if (per_sample_weights.has_value() && per_sample_weights->defined()) {
    check_device(op, "per_sample_weights", *per_sample_weights, cores_in[0]);
  }
  check_sizes(op, indices_in.numel());
  const c10::cuda::CUDAGuard guard(cores_in[0].device());
  const TTDims t = make_dims(op, p_shapes, q_shapes, ranks, num_embeddings);
  const bool cached = cache != nullptr;
  if (cached) {
    check_cache(op, cache->ids, cache->weight, cores_in[0], t.D);
    check_counting(op, *cache, cores_in[0]);
  }
  const auto cores = contiguous_all(cores_in);
  const at::Tensor cache_ids = cached ? cache->ids.contiguous() : at::Tensor();
  const at::Tensor cache_weight = cached ? cache->weight.contiguous() : at::Tensor();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  const int64_t num_bags = offsets.numel() - 1;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty({num_bags, t.D}, cores[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cores[0].scalar_type(), "tt_forward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const at::Tensor psw = weights_as(per_sample_weights, c10::CppTypeToScalarType<acc_t>::value);
    const Batch bt = build_batch<acc_t>(t, p_shapes, indices, offsets, psw, pooling_mode, true, true, stream, cache_ids);
    if (bt.nnz == 0) {
      out.zero_();
      return;
    }
    // Kept for the backward only when one can follow (grad mode on; the module calls
    // this op below autograd with grad mode on, see torchrec_tt/modules/tt_embedding_bag.py).
    if (switches().reuse && c10::GradMode::is_enabled()) {
      CachedBatch entry;
      if (batch_key(
              &entry.key, indices_in, offsets_in, per_sample_weights, pooling_mode, num_embeddings, p_shapes,
              c10::CppTypeToScalarType<acc_t>::value, cached ? cache->ids : at::Tensor())) {
        entry.batch = bt;
        entry.idx = indices_in;
        entry.off = offsets_in;
        entry.w = per_sample_weights.has_value() ? *per_sample_weights : at::Tensor();
        if (cached) entry.cache_ids = cache->ids;
        batch_cache().put(std::move(entry));
      }
    }
    at::Tensor rowbuf = compute_rows<scalar_t, acc_t>(op, t, cores, bt, stream);
    if (cached) {
      int64_t* stats = cache->stats.mutable_data_ptr<int64_t>();
      const dim3 block = rows_block(t.D);
      const unsigned grid = static_cast<unsigned>(std::min<int64_t>(ceil_div(bt.max_urows, block.y), 1024));
      tt_hit_rows_kernel<scalar_t, acc_t><<<std::max(grid, 1u), block, 0, stream>>>(
          bt.counts, bt.urow_dig, cache_weight.const_data_ptr<scalar_t>(), t.D, rowbuf.mutable_data_ptr<acc_t>(), stats,
          bt.nnz);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (cache->count) {
        const unsigned count_grid = static_cast<unsigned>(std::min<int64_t>(ceil_div(bt.max_urows, 256), 1024));
        tt_count_kernel<<<std::max(count_grid, 1u), 256, 0, stream>>>(
            bt.counts, bt.urow_start, bt.skeys, bt.hit_base, cache_ids.const_data_ptr<int64_t>(), t,
            reinterpret_cast<unsigned long long*>(cache->hash_keys.mutable_data_ptr<int64_t>()),
            reinterpret_cast<unsigned long long*>(cache->hash_counts.mutable_data_ptr<int64_t>()),
            cache->hash_keys.numel(), cache->max_probes, stats);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    if (num_bags > 0) {
      const int mean = pooling_mode == static_cast<int64_t>(PoolingMode::MEAN) ? 1 : 0;
      const acc_t* w = psw.defined() ? psw.const_data_ptr<acc_t>() : nullptr;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (t.D % 4 == 0) {  // acc_t is float; rowbuf and out are fresh allocations: 16-byte aligned
          const int D4 = static_cast<int>(t.D / 4);
          const dim3 block(std::min(D4, 32), std::max(1, 256 / std::min(D4, 32)));
          tt_pool_kernel<float4, float4, float><<<grid_1d(num_bags, block.y), block, 0, stream>>>(
              reinterpret_cast<const float4*>(rowbuf.const_data_ptr<float>()), bt.posmap,
              offsets.const_data_ptr<int64_t>(), num_bags, D4, reinterpret_cast<const float*>(w), mean,
              reinterpret_cast<float4*>(out.mutable_data_ptr<float>()));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
      }
      const dim3 block = rows_block(t.D);
      tt_pool_kernel<acc_t, scalar_t, acc_t><<<grid_1d(num_bags, block.y), block, 0, stream>>>(
          rowbuf.const_data_ptr<acc_t>(), bt.posmap, offsets.const_data_ptr<int64_t>(), num_bags, t.D, w, mean,
          out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

at::Tensor tt_embedding_bag_forward_cuda(
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    c10::IntArrayRef p_shapes,
    c10::IntArrayRef q_shapes,
    c10::IntArrayRef ranks,
    int64_t num_embeddings,
    int64_t pooling_mode) {
  return run_forward(
      "torchrec_tt.tt_embedding_bag_forward", cores, indices, offsets, per_sample_weights, p_shapes, q_shapes, ranks,
      num_embeddings, pooling_mode);
}

at::Tensor tt_cached_embedding_bag_forward_cuda(
    at::TensorList cores,
    const at::Tensor& cache_ids,
    const at::Tensor& cache_weight,
    at::Tensor& hash_keys,
    at::Tensor& hash_counts,
    at::Tensor& stats,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    c10::IntArrayRef p_shapes,
    c10::IntArrayRef q_shapes,
    c10::IntArrayRef ranks,
    int64_t num_embeddings,
    int64_t pooling_mode,
    int64_t max_probes,
    bool count) {
  const CacheLookup cache{cache_ids, cache_weight, hash_keys, hash_counts, stats, max_probes, count};
  return run_forward(
      "torchrec_tt.tt_cached_embedding_bag_forward", cores, indices, offsets, per_sample_weights, p_shapes, q_shapes,
      ranks, num_embeddings, pooling_mode, &cache);
}

at::Tensor tt_lookup_rows_cuda(
    at::TensorList cores_in,
    const at::Tensor& indices_in,
    c10::IntArrayRef p_shapes,
    c10::IntArrayRef q_shapes,
    c10::IntArrayRef ranks,
    int64_t num_embeddings) {
  const char* op = "torchrec_tt.tt_lookup_rows";
  check_tt_args(op, cores_in, p_shapes, q_shapes, ranks, num_embeddings);
  check_lookup_indices(op, indices_in);
  check_device(op, "indices", indices_in, cores_in[0]);
  check_sizes(op, indices_in.numel());
  const c10::cuda::CUDAGuard guard(cores_in[0].device());
  const TTDims t = make_dims(op, p_shapes, q_shapes, ranks, num_embeddings);
  const auto cores = contiguous_all(cores_in);
  const at::Tensor indices = indices_in.contiguous();
  const int64_t nnz = indices.numel();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty({nnz, t.D}, cores[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cores[0].scalar_type(), "tt_lookup_rows_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const Batch bt = build_batch<acc_t>(t, p_shapes, indices, at::Tensor(), at::Tensor(), 0, true, false, stream);
    if (nnz == 0) return;
    const at::Tensor rowbuf = compute_rows<scalar_t, acc_t>(op, t, cores, bt, stream);
    const dim3 block = rows_block(t.D);
    tt_gather_kernel<scalar_t, acc_t><<<grid_1d(nnz, block.y), block, 0, stream>>>(
        rowbuf.const_data_ptr<acc_t>(), bt.posmap, nnz, t.D, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

int state_dtype_code(at::ScalarType s) {
  switch (s) {
    case at::kFloat:
      return kStateFloat;
    case at::kDouble:
      return kStateDouble;
    case at::kHalf:
      return kStateHalf;
    case at::kBFloat16:
      return kStateBFloat16;
    default:
      TORCH_CHECK_VALUE(false, "torchrec_tt: optimizer state of dtype ", s, " is not supported by the CUDA kernels");
  }
  return kStateFloat;
}

// One sort of step 5 (tt_cuda_digit_sort.cuh): the items, or unique rows, of a core
// ordered by the core's digit, stable.
struct DigitSortJob {
  const int32_t* src = nullptr;    // digit per entry, valid below *count
  const int32_t* count = nullptr;
  int32_t sentinel = 0;            // key of the entries past the count (sorts last)
  int n = 0;                       // entries sorted
  int passes = 1;                  // kSortBits bits per pass
  int32_t* keys = nullptr;         // out: sorted digits
  int32_t* vals = nullptr;         // out: the entry of each
  int32_t* tmp_keys = nullptr;     // ping-pong buffers (passes >= 2)
  int32_t* tmp_vals = nullptr;
};

// Counts of one pass over all jobs (int64 each; the scan's length).
int64_t digit_sort_counts(const DigitSortJob* jobs, int njobs) {
  int64_t h = 0;
  for (int j = 0; j < njobs; ++j) h += kSortBins * ceil_div(jobs[j].n, kSortTile);
  return h;
}

size_t digit_sort_temp_bytes(int64_t counts, cudaStream_t stream) {
  size_t bytes = 0;
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(
      nullptr, bytes, static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr), static_cast<int>(counts),
      stream));
  return bytes;
}

// All jobs, pass by pass: per pass one histogram launch, one scan, one scatter launch. The
// last pass of a job writes keys / vals, the ones before alternate with the tmp buffers.
void run_digit_sorts(
    const DigitSortJob* jobs, int njobs, int64_t* hist, int64_t* offs, void* temp, size_t temp_bytes,
    cudaStream_t stream) {
  int max_passes = 0;
  for (int j = 0; j < njobs; ++j) max_passes = std::max(max_passes, jobs[j].n > 0 ? jobs[j].passes : 0);
  for (int pass = 0; pass < max_passes; ++pass) {
    DigitSortPass a{};
    a.shift = pass * kSortBits;
    int blocks = 0;
    int64_t h = 0, nb = 0;
    for (int j = 0; j < njobs; ++j) {
      const DigitSortJob& job = jobs[j];
      if (job.n == 0 || pass >= job.passes) continue;
      const int s = a.nsorts++;
      const int tiles = static_cast<int>(ceil_div(job.n, kSortTile));
      a.tile0[s] = blocks;
      a.n[s] = job.n;
      a.hist0[s] = h;
      a.nbase[s] = nb;
      blocks += tiles;
      h += int64_t{kSortBins} * tiles;
      nb += job.n;
      a.src[s] = job.src;
      a.count[s] = job.count;
      a.sentinel[s] = job.sentinel;
      const bool last_parity = (job.passes - 1 - pass) % 2 == 0;  // this pass writes keys / vals
      a.keys_out[s] = last_parity ? job.keys : job.tmp_keys;
      a.vals_out[s] = last_parity ? job.vals : job.tmp_vals;
      a.keys_in[s] = last_parity ? job.tmp_keys : job.keys;  // the previous pass's output
      a.vals_in[s] = last_parity ? job.tmp_vals : job.vals;
    }
    a.tile0[a.nsorts] = blocks;
    a.hist = hist;
    a.offs = offs;
    tt_digit_hist_kernel<<<blocks, kSortThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    size_t b = temp_bytes;
    C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp, b, hist, offs, static_cast<int>(h), stream));
    tt_digit_scatter_kernel<<<blocks, kSortThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Backward: core gradients (mode kWriteGrad into `grads`) or the fused update.
template <typename scalar_t>
void run_backward(
    const char* op,
    const TTDims& t,
    c10::IntArrayRef p_shapes,
    const at::Tensor& grad_output,
    const std::vector<at::Tensor>& cores,
    const std::vector<at::Tensor>& state,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const at::Tensor& indices_in,
    const at::Tensor& offsets_in,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t pooling_mode,
    int mode,
    double learning_rate,
    double eps,
    const std::vector<at::Tensor>& grads,
    cudaStream_t stream,
    const at::Tensor& cache_ids = at::Tensor(),      // cached op: hits train these rows
    const at::Tensor& cache_weight = at::Tensor(),
    const at::Tensor& cache_state = at::Tensor()) {
  using acc_t = at::acc_type<scalar_t, true>;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  Batch bt;
  bool reused = false;
  if (switches().reuse) {
    BatchKey key;
    if (batch_key(
            &key, indices_in, offsets_in, per_sample_weights, pooling_mode, t.num_embeddings, p_shapes, acc_type,
            cache_ids)) {
      reused = batch_cache().take(key, &bt);  // sorted by the forward of the same batch
    }
  }
  if (!reused) {
    const at::Tensor psw = weights_as(per_sample_weights, acc_type);
    bt = build_batch<acc_t>(t, p_shapes, indices, offsets, psw, pooling_mode, false, true, stream, cache_ids);
  }
  const bool cached = cache_ids.defined();
  if (bt.nnz == 0) return;
  const int d = t.d, L = d - 1;
  const int device = cores[0].get_device();
  const at::Tensor go = grad_output.to(acc_type).contiguous();

  // Scratch of steps 4-6, one allocation: per-item / per-row records, digit sort
  // buffers, chunk partials of the reductions, the list of runs that cross chunks.
  acc_t* xbuf = nullptr;
  acc_t* tbuf[kMaxCores] = {};
  acc_t* dtbuf[kMaxCores] = {};
  int32_t* sorted_keys[kMaxCores] = {};
  int32_t* perms[kMaxCores] = {};
  acc_t* pf[kMaxCores + 1] = {};  // [d]: the cache
  acc_t* pl[kMaxCores + 1] = {};
  acc_t* hbuf = nullptr;  // cached op: gradient of every hit row, and its slot
  int32_t* hdig = nullptr;
  int64_t* sort_hist = nullptr;
  int64_t* sort_offs = nullptr;
  int2* cross = nullptr;
  void* temp = nullptr;
  int64_t nkeys[kMaxCores] = {};
  // Step 5's sorts: every core's items (the last core's unique rows) by its digit, but
  // core d-2's: the item order already groups it.
  DigitSortJob jobs[kMaxCores];
  int njobs = 0;
  for (int k = 0; k < d; ++k) {
    nkeys[k] = k == L ? bt.max_urows : bt.max_items;
    if (k == L - 1) continue;
    DigitSortJob& job = jobs[njobs++];
    job.src = k == L ? bt.urow_dig : bt.item_dig[k];
    job.count = bt.counts + (k == L ? kTTRows : kItems);
    job.sentinel = t.p[k];
    job.n = static_cast<int>(nkeys[k]);
    job.passes = static_cast<int>(ceil_div(bits_for(static_cast<uint64_t>(t.p[k])), kSortBits));
  }
  const int64_t sort_counts = digit_sort_counts(jobs, njobs);
  const size_t temp_bytes = digit_sort_temp_bytes(sort_counts, stream);
  Arena ar;
  ar.add(&xbuf, bt.max_urows * t.S[L]);
  // The fast item kernels write no T record for core 1 (its reduction reads core 0); the
  // tensor-core one sums core 1's slice gradients itself (`fused1`: no dT record either).
  bool fast = false;
  if constexpr (std::is_same_v<scalar_t, float>) {
    fast = fast_path_ok(t, cores, go.const_data_ptr());
  }
  const bool fused1 = fast && fast_mma(true);
  for (int k = 0; k < L; ++k) {
    if (!(fused1 && k == 1)) ar.add(&dtbuf[k], bt.max_items * int64_t{t.Q[k]} * t.n[k]);
    if (k >= 1 && !(fast && k == 1)) ar.add(&tbuf[k], bt.max_items * int64_t{t.Q[k]} * t.r[k]);
  }
  for (int k = 0; k < d; ++k) {
    if (k != L - 1) {
      ar.add(&sorted_keys[k], nkeys[k]);
      ar.add(&perms[k], nkeys[k]);
    }
    const int64_t nchunks = ceil_div(nkeys[k], kReduceChunk);
    ar.add(&pf[k], nchunks * t.S[k]);
    ar.add(&pl[k], nchunks * t.S[k]);
  }
  for (int j = 0; j < njobs; ++j) {
    if (jobs[j].passes > 1) {
      ar.add(&jobs[j].tmp_keys, jobs[j].n);
      ar.add(&jobs[j].tmp_vals, jobs[j].n);
    }
  }
  ar.add(&sort_hist, sort_counts);
  ar.add(&sort_offs, sort_counts);
  if (cached) {
    ar.add(&hbuf, bt.max_urows * int64_t{t.D});
    ar.add(&hdig, bt.max_urows);
    ar.add(&pf[d], ceil_div(bt.max_urows, kReduceChunk) * t.D);
    ar.add(&pl[d], ceil_div(bt.max_urows, kReduceChunk) * t.D);
  }
  // A crossing run spans >= 2 chunks and is the only run of its digit (cache slot):
  // at most min(chunks, distinct digits) per entry. Two lists: core 1's runs on the fused
  // path (listed by the item kernel, finished by their own tail launch) after the others.
  const int nentries = d + (cached ? 1 : 0);
  int64_t cross_cap = 0, fused_cap = 0;
  for (int k = 0; k < nentries; ++k) {
    const int64_t n = k == d ? bt.max_urows : nkeys[k];
    const int64_t distinct = k == d ? cache_ids.numel() : t.p[k];
    (fused1 && k == 1 ? fused_cap : cross_cap) += std::min(ceil_div(n, kReduceChunk), distinct);
  }
  TORCH_CHECK((cross_cap + fused_cap) * kTailParts < INT_MAX, op, ": too many reduction chunks");
  ar.add(&cross, cross_cap + fused_cap);
  ar.add_bytes(&temp, std::max<size_t>(temp_bytes, 1));
  const at::Tensor scratch = ar.allocate(cores[0].options());
  if (L >= 1) sorted_keys[L - 1] = bt.item_dig[L - 1];  // items come grouped by this digit
  for (int k = 0, j = 0; k < d; ++k) {
    if (k == L - 1) continue;
    jobs[j].keys = sorted_keys[k];
    jobs[j].vals = perms[k];
    ++j;
  }

  // Plan of step 6 (before step 4: the fused item kernel takes core 1's entry): every
  // core's slices reduced and finalised (gradient or update): one launch per kind of sum
  // (plain sums of the first and last cores, T^T dT of the middle ones), each kind
  // compiled with its own register budget; the runs that cross chunks in one more launch
  // for all cores.
  const int sdt = state.empty() ? kStateFloat : state_dtype_code(state[0].scalar_type());
  ReduceLaunch<scalar_t, acc_t> kind_launch[kNumReduceKinds]{};
  size_t kind_bytes[kNumReduceKinds] = {};
  ReduceLaunch<scalar_t, acc_t> tl{};
  size_t tail_bytes = 0;
  for (int k = 0; k < nentries; ++k) {
    // middle cores sum T_{k-1}^T dT_k (register-tiled for r_k = 32, n_k = 128 in float),
    // the first and last a plain sum of their S-element rows; entry d (cached op) sums
    // the hit rows' gradients per cache slot and trains the cached rows like a core
    // of D-element slices
    const bool is_cache = k == d;
    const bool has_T = k >= 1 && k < L;
    const bool fused_entry = fused1 && k == 1;  // summed by the item kernel: no reduction launch
    const bool fast_t = std::is_same_v<acc_t, float> && has_T && t.r[k] == 32 && t.n[k] == 128;
    const int kind = !has_T ? kPlainSum : fast_t ? kFastT : kGemmT;
    const int S = is_cache ? t.D : t.S[k];
    ReduceArgs<scalar_t, acc_t> r{};
    r.Q = is_cache ? 1 : t.Q[k];
    r.rk = is_cache ? 1 : t.r[k];
    r.nk = is_cache ? t.D : t.n[k];
    r.S = S;
    r.count = bt.counts + (is_cache ? kHitRows : k == L ? kTTRows : kItems);
    r.digits = is_cache ? hdig : sorted_keys[k];
    r.perm = is_cache ? nullptr : perms[k];
    r.tbuf = has_T ? tbuf[k] : nullptr;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (fast && k == 1 && !fused_entry) {  // T_0 = G_0[i_0], read from core 0 (updated after this reduction)
        r.tbuf = cores[0].const_data_ptr<scalar_t>();
        r.tdig = bt.item_dig[0];
      }
    }
    r.dtbuf = is_cache ? hbuf : k == L ? xbuf : dtbuf[k];
    r.pf = pf[k];
    r.pl = pl[k];
    r.mode = mode;
    r.grad = grads.empty() || is_cache ? nullptr : grads[k].mutable_data_ptr<scalar_t>();
    r.core = mode == kWriteGrad ? nullptr
        : is_cache              ? cache_weight.mutable_data_ptr<scalar_t>()
                                : cores[k].mutable_data_ptr<scalar_t>();
    if (is_cache) {
      r.state = cache_state.defined() ? cache_state.mutable_data_ptr() : nullptr;
      r.state_dtype = cache_state.defined() ? state_dtype_code(cache_state.scalar_type()) : kStateFloat;
    } else {
      r.state = state.empty() ? nullptr : state[k].mutable_data_ptr();
      r.state_dtype = sdt;
    }
    r.lr = static_cast<acc_t>(learning_rate);
    r.eps = static_cast<acc_t>(eps);
    r.entry = k;
    r.cross = fused_entry ? cross + cross_cap : cross;
    r.ncross = bt.counts + (fused_entry ? kCrossRunsFused : kCrossRuns);
    r.cross_cap = static_cast<int>(fused_entry ? fused_cap : cross_cap);
    if (!fused_entry) {
      SmemPlan sp;
      const int64_t stage_elems = has_T ? int64_t{kNI} * t.Q[k] * (t.r[k] + t.n[k]) : 0;
      if (kind == kFastT && stage_elems >= S) {
        // register-tiled sums: the slice is written to shared memory only after the last
        // staging, so it can take the staging buffers' place (more blocks per SM)
        r.sm_ts = sp.take(int64_t{kNI} * t.Q[k] * t.r[k]);
        r.sm_dts = sp.take(int64_t{kNI} * t.Q[k] * t.n[k]);
        r.sm_acc = r.sm_ts;
      } else {
        r.sm_acc = sp.take(S);
        if (has_T) {
          r.sm_ts = sp.take(int64_t{kNI} * t.Q[k] * t.r[k]);
          r.sm_dts = sp.take(int64_t{kNI} * t.Q[k] * t.n[k]);
          if (kind == kGemmT) r.sm_scratch = sp.take(kGemmScratch);
        }
      }
      r.sm_red = sp.take(kThreads + 4);
      const int64_t nb = ceil_div(is_cache ? bt.max_urows : nkeys[k], kReduceChunk);
      ReduceLaunch<scalar_t, acc_t>& kl = kind_launch[kind];
      TORCH_CHECK(kl.block0[kl.ncores] + nb < INT_MAX, op, ": too many reduction blocks");
      kl.r[kl.ncores] = r;
      kl.block0[kl.ncores + 1] = kl.block0[kl.ncores] + static_cast<int>(nb);
      ++kl.ncores;
      kind_bytes[kind] = std::max(kind_bytes[kind], static_cast<size_t>(sp.off) * sizeof(acc_t));
    }
    // the tail kernel needs the accumulator and the reduction scratch only
    SmemPlan tp;
    r.sm_acc = tp.take(S);
    r.sm_red = tp.take(kThreads + 4);
    tail_bytes = std::max(tail_bytes, static_cast<size_t>(tp.off) * sizeof(acc_t));
    tl.r[k] = r;
  }
  tl.ncores = nentries;
  auto tail = tt_reduce_tail_kernel<scalar_t, acc_t>;
  prepare_smem(op, tail, tail_bytes, device);
  auto launch_tail = [&](const int2* list, int count, int64_t cap, cudaStream_t s) {
    tl.cross = list;
    tl.ncross = bt.counts + count;
    tail<<<static_cast<unsigned>(std::max<int64_t>(cap, 1) * kTailParts), kThreads, tail_bytes, s>>>(tl);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };

  // Step 5 (on the side stream, beside step 4): every core's items (unique rows) sorted by
  // its digit, where the item order does not group them.
  SideStream side(stream, device);
  side.wait_for_main();
  run_digit_sorts(jobs, njobs, sort_hist, sort_offs, temp, temp_bytes, side.stream());
  side.mark_sorted();

  // Step 4: items (prefix products, row gradients, per-item factors).
  if (fast) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      FastArgs f = fast_args(cores, bt);
      f.grad_out = go.const_data_ptr<float>();
      f.sbag = bt.sbag;
      f.sscale = static_cast<const float*>(bt.sscale);
      f.xbuf = xbuf;
      f.dtbuf0 = dtbuf[0];
      f.dtbuf1 = dtbuf[1];
      if (fused1) f.r1 = tl.r[1];
      launch_fast_items<true>(op, f, bt.max_items, device, stream);
    }
  } else {
    auto a = item_args<scalar_t, acc_t>(t, cores, bt);
    a.grad_out = go.const_data_ptr<acc_t>();
    a.sbag = bt.sbag;
    a.sscale = static_cast<const acc_t*>(bt.sscale);
    a.xbuf = xbuf;
    for (int k = 0; k < L; ++k) {
      a.dtbuf[k] = dtbuf[k];
      a.tbuf[k] = tbuf[k];
    }
    int64_t elems = 0;
    a.sm = plan_items(t, true, &elems);
    const size_t bytes = static_cast<size_t>(elems) * sizeof(acc_t);
    auto kernel = tt_item_kernel<scalar_t, acc_t, true>;
    prepare_smem(op, kernel, bytes, device);
    kernel<<<grid_1d(bt.max_items, kItemsPerBlock), kThreads, bytes, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  if (cached) {  // the hit rows' gradients, summed per row like the TT rows' (reduced per slot in step 6)
    const dim3 block = rows_block(t.D);
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>(ceil_div(bt.max_urows, block.y), 1024));
    tt_hit_grad_kernel<acc_t><<<std::max(grid, 1u), block, 0, stream>>>(
        bt.counts, bt.urow_start, bt.urow_dig, bt.sbag, static_cast<const acc_t*>(bt.sscale), go.const_data_ptr<acc_t>(),
        t.D, hbuf, hdig);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Core 1's runs over several chunks of the fused item kernel (on the side stream,
  // beside step 6: it updates core 1 only, which step 6 neither reads nor writes).
  if (fused_cap > 0) {
    side.wait_for_main();
    launch_tail(cross + cross_cap, kCrossRunsFused, fused_cap, side.stream());
  }

  // Step 6: the reductions planned above, launched, then the other runs over several chunks.
  side.main_waits_sorted();
  const decltype(&tt_reduce_kernel<scalar_t, acc_t, kPlainSum>) kernels[kNumReduceKinds] = {
      tt_reduce_kernel<scalar_t, acc_t, kPlainSum>, tt_reduce_kernel<scalar_t, acc_t, kGemmT>,
      tt_reduce_kernel<scalar_t, acc_t, kFastT, kFastTMinBlocks>};
  // the middle cores first: core 1 of the FMA fast path reads core 0, which the plain sums update
  for (const int kind : {kFastT, kGemmT, kPlainSum}) {
    const ReduceLaunch<scalar_t, acc_t>& kl = kind_launch[kind];
    if (kl.ncores == 0) continue;
    prepare_smem(op, kernels[kind], kind_bytes[kind], device);
    kernels[kind]<<<kl.block0[kl.ncores], kThreads, kind_bytes[kind], stream>>>(kl);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch_tail(cross, kCrossRuns, cross_cap, stream);
  side.join();
}

struct BackwardPrep {
  TTDims t;
  std::vector<at::Tensor> cores;
  at::Tensor indices, offsets, grad_output;
};

BackwardPrep prepare_backward(
    const char* op,
    const at::Tensor& grad_output,
    at::TensorList cores_in,
    const at::Tensor& indices_in,
    const at::Tensor& offsets_in,
    const std::optional<at::Tensor>& per_sample_weights,
    c10::IntArrayRef p_shapes,
    c10::IntArrayRef q_shapes,
    c10::IntArrayRef ranks,
    int64_t num_embeddings,
    int64_t pooling_mode) {
  check_tt_args(op, cores_in, p_shapes, q_shapes, ranks, num_embeddings);
  check_bag_shapes(op, indices_in, offsets_in, per_sample_weights, pooling_mode);
  check_grad_output(op, grad_output, offsets_in, q_shapes);
  check_device(op, "indices", indices_in, cores_in[0]);
  check_device(op, "offsets", offsets_in, cores_in[0]);
  check_device(op, "grad_output", grad_output, cores_in[0]);
  if (per_sample_weights.has_value() && per_sample_weights->defined()) {
    check_device(op, "per_sample_weights", *per_sample_weights, cores_in[0]);
  }
  check_sizes(op, indices_in.numel());
  BackwardPrep bp;
  bp.t = make_dims(op, p_shapes, q_shapes, ranks, num_embeddings);
  bp.indices = indices_in.contiguous();
  bp.offsets = offsets_in.to(at::kLong).contiguous();
  bp.grad_output = grad_output;
  return bp;
}

std::vector<at::Tensor> tt_embedding_bag_backward_cuda(
    const at::Tensor& grad_output,
    at::TensorList cores_in,
    const at::Tensor& indices_in,
    const at::Tensor& offsets_in,
    const std::optional<at::Tensor>& per_sample_weights,
    c10::IntArrayRef p_shapes,
    c10::IntArrayRef q_shapes,
    c10::IntArrayRef ranks,
    int64_t num_embeddings,
    int64_t pooling_mode) {
  const char* op = "torchrec_tt.tt_embedding_bag_backward";
  BackwardPrep bp = prepare_backward(
      op, grad_output, cores_in, indices_in, offsets_in, per_sample_weights, p_shapes, q_shapes, ranks, num_embeddings,
      pooling_mode);
  const c10::cuda::CUDAGuard guard(cores_in[0].device());
  const auto cores = contiguous_all(cores_in);
  std::vector<at::Tensor> grads;
  grads.reserve(cores.size());
  for (const auto& c : cores) grads.push_back(at::zeros_like(c, at::MemoryFormat::Contiguous));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cores[0].scalar_type(), "tt_backward_cuda", [&] {
    run_backward<scalar_t>(
        op, bp.t, p_shapes, bp.grad_output, cores, {}, bp.indices, bp.offsets, indices_in, offsets_in, per_sample_weights,
        pooling_mode, kWriteGrad, 0.0, 0.0, grads, stream);
  });
  return grads;
}

// The conditions of check_optimizer_state (tt_checks.h), evaluated without building
// any message: that function formats its expected shape eagerly, which we keep off
// the hot path; it is called only to raise when this says no.
bool optimizer_state_ok(at::TensorList cores, at::TensorList state, int64_t optimizer) {
  if (optimizer == static_cast<int64_t>(FusedOptimizer::SGD)) return state.empty();
  if (optimizer != static_cast<int64_t>(FusedOptimizer::ADAGRAD) &&
      optimizer != static_cast<int64_t>(FusedOptimizer::ROWWISE_ADAGRAD)) {
    return false;
  }
  if (state.size() != cores.size()) return false;
  const bool adagrad = optimizer == static_cast<int64_t>(FusedOptimizer::ADAGRAD);
  for (size_t k = 0; k < cores.size(); ++k) {
    const bool shape_ok = adagrad ? state[k].sizes() == cores[k].sizes()
                                  : (state[k].dim() == 1 && state[k].size(0) == cores[k].size(0));
    if (!shape_ok || state[k].device() != cores[k].device() || !state[k].is_floating_point()) return false;
  }
  return true;
}

// The fused backward of both fused ops; with `cache_ids` the hits train `cache_weight`
// (state `cache_state`: undefined for SGD) and the TT misses the cores.
void run_backward_fused(
    const char* op,
    const at::Tensor& grad_output,
    at::TensorList cores_in,
    at::TensorList optimizer_state,
    const at::Tensor& indices_in,
    const at::Tensor& offsets_in,
    const std::optional<at::Tensor>& per_sample_weights,
    c10::IntArrayRef p_shapes,
    c10::IntArrayRef q_shapes,
    c10::IntArrayRef ranks,
    int64_t num_embeddings,
    int64_t pooling_mode,
    int64_t optimizer,
    double learning_rate,
    double eps,
    const at::Tensor& cache_ids = at::Tensor(),
    const at::Tensor& cache_weight = at::Tensor(),
    const at::Tensor& cache_state = at::Tensor()) {
  BackwardPrep bp = prepare_backward(
      op, grad_output, cores_in, indices_in, offsets_in, per_sample_weights, p_shapes, q_shapes, ranks, num_embeddings,
      pooling_mode);
  if (!optimizer_state_ok(cores_in, optimizer_state, optimizer)) {
    check_optimizer_state(op, cores_in, optimizer_state, optimizer);  // raises with the reference's message
  }
  for (size_t k = 0; k < cores_in.size(); ++k) {
    TORCH_CHECK_VALUE(cores_in[k].is_contiguous(), op, ": cores[", k, "] must be contiguous (it is updated in place)");
  }
  for (size_t k = 0; k < optimizer_state.size(); ++k) {
    TORCH_CHECK_VALUE(
        optimizer_state[k].is_contiguous(), op, ": optimizer_state[", k, "] must be contiguous (it is updated in place)");
    TORCH_CHECK_VALUE(
        optimizer_state[k].scalar_type() == optimizer_state[0].scalar_type(), op,
        ": all optimizer_state tensors must share one dtype");
    state_dtype_code(optimizer_state[k].scalar_type());
  }
  if (cache_ids.defined()) {
    check_cache(op, cache_ids, cache_weight, cores_in[0], bp.t.D);
    TORCH_CHECK_VALUE(cache_weight.is_contiguous(), op, ": cache_weight must be contiguous (it is updated in place)");
    const int64_t C = cache_ids.numel();
    if (optimizer == static_cast<int64_t>(FusedOptimizer::SGD)) {
      TORCH_CHECK_VALUE(!cache_state.defined(), op, ": SGD takes no cache optimizer state, got one");
    } else {
      const bool adagrad = optimizer == static_cast<int64_t>(FusedOptimizer::ADAGRAD);
      TORCH_CHECK_VALUE(
          cache_state.defined() && cache_state.is_contiguous() && cache_state.is_floating_point() &&
              (adagrad ? cache_state.sizes() == cache_weight.sizes() : (cache_state.dim() == 1 && cache_state.size(0) == C)),
          op, ": the cache optimizer state must be a contiguous floating tensor of shape ",
          adagrad ? cache_weight.sizes() : c10::IntArrayRef{C}, " (", adagrad ? "Adagrad" : "row-wise Adagrad", ")");
      check_device(op, "cache optimizer state", cache_state, cores_in[0]);
      state_dtype_code(cache_state.scalar_type());
    }
  }
  const c10::cuda::CUDAGuard guard(cores_in[0].device());
  const std::vector<at::Tensor> cores(cores_in.begin(), cores_in.end());
  const std::vector<at::Tensor> state(optimizer_state.begin(), optimizer_state.end());
  const int mode = optimizer == static_cast<int64_t>(FusedOptimizer::SGD)       ? kSGD
      : optimizer == static_cast<int64_t>(FusedOptimizer::ADAGRAD)              ? kAdagrad
                                                                                : kRowwiseAdagrad;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cores[0].scalar_type(), "tt_backward_fused_cuda", [&] {
    run_backward<scalar_t>(
        op, bp.t, p_shapes, bp.grad_output, cores, state, bp.indices, bp.offsets, indices_in, offsets_in,
        per_sample_weights, pooling_mode, mode, learning_rate, eps, {}, stream, cache_ids, cache_weight, cache_state);
  });
}

void tt_embedding_bag_backward_fused_cuda(
    const at::Tensor& grad_output,
    at::TensorList cores,
    at::TensorList optimizer_state,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    c10::IntArrayRef p_shapes,
    c10::IntArrayRef q_shapes,
    c10::IntArrayRef ranks,
    int64_t num_embeddings,
    int64_t pooling_mode,
    int64_t optimizer,
    double learning_rate,
    double eps) {
  run_backward_fused(
      "torchrec_tt.tt_embedding_bag_backward_fused_", grad_output, cores, optimizer_state, indices, offsets,
      per_sample_weights, p_shapes, q_shapes, ranks, num_embeddings, pooling_mode, optimizer, learning_rate, eps);
}

void tt_cached_embedding_bag_backward_fused_cuda(
    const at::Tensor& grad_output,
    at::TensorList cores,
    at::TensorList optimizer_state,
    const at::Tensor& cache_ids,
    const at::Tensor& cache_weight,
    at::TensorList cache_optimizer_state,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    c10::IntArrayRef p_shapes,
    c10::IntArrayRef q_shapes,
    c10::IntArrayRef ranks,
    int64_t num_embeddings,
    int64_t pooling_mode,
    int64_t optimizer,
    double learning_rate,
    double eps) {
  const char* op = "torchrec_tt.tt_cached_embedding_bag_backward_fused_";
  TORCH_CHECK_VALUE(
      cache_optimizer_state.size() <= 1, op, ": cache_optimizer_state holds at most one tensor, got ",
      cache_optimizer_state.size());
  run_backward_fused(
      op, grad_output, cores, optimizer_state, indices, offsets, per_sample_weights, p_shapes, q_shapes, ranks,
      num_embeddings, pooling_mode, optimizer, learning_rate, eps, cache_ids, cache_weight,
      cache_optimizer_state.empty() ? at::Tensor() : cache_optimizer_state[0]);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchrec_tt, CUDA, m) {
  m.impl("tt_embedding_bag_forward", &tt_embedding_bag_forward_cuda);
  m.impl("tt_embedding_bag_backward", &tt_embedding_bag_backward_cuda);
  m.impl("tt_embedding_bag_backward_fused_", &tt_embedding_bag_backward_fused_cuda);
  m.impl("tt_lookup_rows", &tt_lookup_rows_cuda);
  m.impl("tt_cached_embedding_bag_forward", &tt_cached_embedding_bag_forward_cuda);
  m.impl("tt_cached_embedding_bag_backward_fused_", &tt_cached_embedding_bag_backward_fused_cuda);
}

}  // namespace torchrec_tt
