// A stable radix sort of a batch of (key, input position) pairs run by one cooperative
// launch (step 2 of the pipeline for batch-sized inputs; tt_embedding_bag_cuda.cu).
//
// cub's onesweep sort of 82k pairs is ten GPU items (five memsets, a histogram, a scan and
// three passes), and each item costs launch latency that the passes' own work (~8 us) does
// not hide. Here one grid whose blocks are all resident (a cooperative launch) holds one
// tile of kGridSortTile pairs per block and, per 8-bit digit (least significant first):
//   1. loads its tile warp-striped (lane-contiguous: coalesced), pads past n with the
//      largest key, ranks it by the digit (cub::BlockRadixRankMatch: stable in the
//      warp-striped order, which is the tile's position order), and publishes the tile's
//      count of every digit;
//   2. waits for the grid, then sums the counts of the earlier tiles (same digit) and of all
//      tiles (every smaller digit): the first destination of each of its digits;
//   3. scatters its pairs there and waits for the grid again.
// Every tile is in registers before any block scatters (step 2 waits for the grid), so
// each pass sorts in place in the output buffers. The result is the unique stable order
// by key (ties in input position order), the same as cub::DeviceRadixSort::SortPairs.
// Loads of data written by other blocks of the launch bypass L1 (__ldcg).
#pragma once

#include <cooperative_groups.h>

#include <cub/block/block_radix_rank.cuh>
#include <cub/block/block_scan.cuh>

#include <cstdint>

namespace torchrec_tt {
namespace cuda_detail {

constexpr int kGridSortThreads = 256;
constexpr int kGridSortItems = 8;  // pairs per thread
constexpr int kGridSortTile = kGridSortThreads * kGridSortItems;
constexpr int kGridSortBits = 8;
constexpr int kGridSortDigits = 1 << kGridSortBits;
// Tiles (blocks) at most: every block reads all tiles' counts of its pass (G x 1 KiB).
constexpr int kGridSortMaxTiles = 64;
static_assert(kGridSortDigits == kGridSortThreads, "one digit per thread in the count and offset steps");

// Digit `pass` (8 bits) of a key, for cub's block rank.
struct GridSortDigit {
  int shift;
  __device__ __forceinline__ uint32_t Digit(uint64_t key) const {
    return static_cast<uint32_t>(key >> shift) & (kGridSortDigits - 1);
  }
};

using GridSortRank = cub::BlockRadixRankMatch<kGridSortThreads, kGridSortBits, false>;
using GridSortScan = cub::BlockScan<int, kGridSortThreads>;

struct GridSortShared {
  union {
    typename GridSortRank::TempStorage rank;
    typename GridSortScan::TempStorage scan;
  };
  int dest[kGridSortDigits];  // a pair of digit d and tile rank r goes to dest[d] + r
};

// The count of each digit in the tile (thread t: digit t), from cub's rank callback.
struct GridSortCount {
  int* count;
  __device__ __forceinline__ void operator()(int (&bins)[1]) const {
    *count = bins[0];
  }
};

// Sorts the n pairs (keys_in[i], i) by bits [0, 8 * passes) of the key into keys / vals.
// hist: passes x gridDim.x x kGridSortDigits ints of scratch. Every block of the grid
// must call it (it waits for the grid 2 * passes times).
__device__ __forceinline__ void grid_sort_pairs(
    const cooperative_groups::grid_group& grid,
    GridSortShared& s,
    const uint64_t* keys_in,
    uint64_t* keys,
    int32_t* vals,
    int n,
    int passes,
    int* hist) {
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int tile = static_cast<int>(blockIdx.x), tiles = static_cast<int>(gridDim.x);
  const int base = tile * kGridSortTile;
  const int pads = max(0, base + kGridSortTile - n);  // they rank last: digit kGridSortDigits - 1
  for (int pass = 0; pass < passes; ++pass) {
    uint64_t k[kGridSortItems];
    int32_t v[kGridSortItems];
#pragma unroll
    for (int j = 0; j < kGridSortItems; ++j) {
      const int i = base + (warp * kGridSortItems + j) * 32 + lane;  // warp-striped
      k[j] = ~uint64_t{0};
      v[j] = 0;
      if (i < n) {
        k[j] = __ldcg(pass == 0 ? keys_in + i : keys + i);
        v[j] = pass == 0 ? i : __ldcg(vals + i);
      }
    }
    int rank[kGridSortItems];
    int first[1];
    int count = 0;
    GridSortRank(s.rank).RankKeys(k, rank, GridSortDigit{pass * kGridSortBits}, first, GridSortCount{&count});
    if (tid == kGridSortDigits - 1) count -= pads;
    int* h = hist + static_cast<int64_t>(pass) * tiles * kGridSortDigits;
    h[tile * kGridSortDigits + tid] = count;
    grid.sync();  // also the block barrier before s.scan reuses s.rank

    int before = 0, total = 0;
    for (int b = 0; b < tiles; ++b) {
      const int c = __ldcg(h + b * kGridSortDigits + tid);
      total += c;
      before += b < tile ? c : 0;
    }
    int digit_start = 0;
    GridSortScan(s.scan).ExclusiveSum(total, digit_start);
    s.dest[tid] = digit_start + before - first[0];
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kGridSortItems; ++j) {
      if (base + (warp * kGridSortItems + j) * 32 + lane < n) {
        const int d = s.dest[GridSortDigit{pass * kGridSortBits}.Digit(k[j])] + rank[j];
        keys[d] = k[j];
        vals[d] = v[j];
      }
    }
    grid.sync();
  }
}

}  // namespace cuda_detail
}  // namespace torchrec_tt
