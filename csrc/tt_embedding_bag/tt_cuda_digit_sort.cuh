// Stable sort of small integer keys by least-significant-digit counting passes, several
// independent sorts per launch (the CUDA TT embedding-bag backward, step 5: the items, or
// unique rows, of every core sorted by that core's digit).
//
// A pass sorts by kSortBits bits of the key, in tiles of kSortTile entries:
//   1. tt_digit_hist_kernel: one block per tile counts the tile's digits;
//      counts[hist0 + digit * ntiles + tile].
//   2. an exclusive scan of all counts (cub::DeviceScan, host side): in that layout the scan
//      at (digit, tile) is where the tile's first entry of that digit goes.
//   3. tt_digit_scatter_kernel: one block per tile sorts the tile by the digit in shared
//      memory (cub::BlockRadixSort, stable) and writes every entry to its base plus its
//      rank among the tile's entries of that digit.
// No look-back chain between tiles (onesweep's is what makes a one-pass cub sort of ~50k
// keys latency bound), and all sorts of a step share each launch. Equal keys keep their
// order (the tiles in order, the block sort stable): the same input gives the same order.
#pragma once

#include <cub/block/block_radix_sort.cuh>

#include <cstdint>

#include "tt_cuda_common.cuh"

namespace torchrec_tt {
namespace cuda_detail {

constexpr int kSortThreads = 256;
constexpr int kSortPerThread = 2;
constexpr int kSortTile = kSortThreads * kSortPerThread;
constexpr int kSortBits = 8;
constexpr int kSortBins = 1 << kSortBits;
static_assert(kSortBins == kSortThreads, "one bin per thread");

// One counting pass over up to kMaxCores sorts. Pass 0 reads the keys from `src`
// (entries i >= *count get the key `sentinel`) with values i; later passes read the last
// pass's output (keys_in / vals_in).
struct DigitSortPass {
  int nsorts;
  int shift;                       // the pass sorts by bits [shift, shift + kSortBits)
  int tile0[kMaxCores + 1];        // blocks [tile0[s], tile0[s + 1]) serve sort s
  int n[kMaxCores];                // entries of sort s
  int64_t hist0[kMaxCores];        // sort s's counts start here
  int64_t nbase[kMaxCores];        // entries of the sorts before s (the scan runs over all)
  const int32_t* src[kMaxCores];   // pass 0
  const int32_t* count[kMaxCores];
  int32_t sentinel[kMaxCores];
  const int32_t* keys_in[kMaxCores];  // later passes
  const int32_t* vals_in[kMaxCores];
  int32_t* keys_out[kMaxCores];
  int32_t* vals_out[kMaxCores];
  int64_t* hist;                   // counts, written by the hist kernel
  const int64_t* offs;             // their exclusive scan, read by the scatter kernel
};

// Key and value of entry i (< n) of sort s; `count`: *a.count[s] on pass 0.
__device__ __forceinline__ void digit_sort_input(const DigitSortPass& a, int s, int i, int count, int32_t& key, int32_t& val) {
  if (a.shift == 0) {
    key = i < count ? a.src[s][i] : a.sentinel[s];
    val = i;
  } else {
    key = a.keys_in[s][i];
    val = a.vals_in[s][i];
  }
}

__global__ void __launch_bounds__(kSortThreads) tt_digit_hist_kernel(const __grid_constant__ DigitSortPass a) {
  __shared__ int h[kSortBins];
  int tile = 0;
  const int s = part_of_block(a.tile0, a.nsorts, &tile);
  const int tid = threadIdx.x;
  h[tid] = 0;
  __syncthreads();
  const int count = a.shift == 0 ? *a.count[s] : 0;
  for (int j = 0; j < kSortPerThread; ++j) {
    const int i = tile * kSortTile + j * kSortThreads + tid;
    if (i < a.n[s]) {
      int32_t key, val;
      digit_sort_input(a, s, i, count, key, val);
      atomicAdd(&h[(key >> a.shift) & (kSortBins - 1)], 1);  // integer counts: order-free
    }
  }
  __syncthreads();
  const int ntiles = a.tile0[s + 1] - a.tile0[s];
  a.hist[a.hist0[s] + static_cast<int64_t>(tid) * ntiles + tile] = h[tid];
}

__global__ void __launch_bounds__(kSortThreads) tt_digit_scatter_kernel(const __grid_constant__ DigitSortPass a) {
  using BlockSort = cub::BlockRadixSort<uint32_t, kSortThreads, kSortPerThread, int32_t>;
  __shared__ union {
    typename BlockSort::TempStorage sort;
    uint32_t digit[kSortTile];  // the tile's digits in sorted order
  } sm;
  __shared__ int32_t skey[kSortTile], sval[kSortTile];  // the tile's entries in input order
  __shared__ int64_t base[kSortBins];                   // output of the digit's entry of sorted rank q: base + q
  int tile = 0;
  const int s = part_of_block(a.tile0, a.nsorts, &tile);
  const int tid = threadIdx.x;
  const int n = a.n[s];
  const int count = a.shift == 0 ? *a.count[s] : 0;
  // blocked arrangement (thread t holds entries 2t, 2t + 1): the order BlockRadixSort keeps
  uint32_t dig[kSortPerThread];
  int32_t loc[kSortPerThread];
#pragma unroll
  for (int j = 0; j < kSortPerThread; ++j) {
    const int l = tid * kSortPerThread + j;
    const int i = tile * kSortTile + l;
    dig[j] = kSortBins - 1;  // past the end: sorted last, not written
    if (i < n) {
      int32_t key, val;
      digit_sort_input(a, s, i, count, key, val);
      skey[l] = key;
      sval[l] = val;
      dig[j] = static_cast<uint32_t>(key >> a.shift) & (kSortBins - 1);
    }
    loc[j] = l;
  }
  BlockSort(sm.sort).Sort(dig, loc, 0, kSortBits);
  __syncthreads();  // the sort's storage becomes the digit array
#pragma unroll
  for (int j = 0; j < kSortPerThread; ++j) sm.digit[tid * kSortPerThread + j] = dig[j];
  __syncthreads();
  const int ntiles = a.tile0[s + 1] - a.tile0[s];
#pragma unroll
  for (int j = 0; j < kSortPerThread; ++j) {
    const int q = tid * kSortPerThread + j;
    if (q == 0 || sm.digit[q - 1] != dig[j]) {  // the tile's first entry of this digit
      base[dig[j]] = a.offs[a.hist0[s] + static_cast<int64_t>(dig[j]) * ntiles + tile] - a.nbase[s] - q;
    }
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kSortPerThread; ++j) {
    const int l = loc[j];
    if (tile * kSortTile + l < n) {
      const int64_t pos = base[dig[j]] + tid * kSortPerThread + j;
      a.keys_out[s][pos] = skey[l];
      a.vals_out[s][pos] = sval[l];
    }
  }
}

}  // namespace cuda_detail
}  // namespace torchrec_tt
