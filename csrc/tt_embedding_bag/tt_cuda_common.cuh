// Device-side building blocks of the CUDA TT embedding-bag kernels
// (tt_embedding_bag_cuda.cu): the TT shape descriptor passed to kernels, the
// row-id <-> sort-key mapping, a block-wide small GEMM on shared memory, and
// typed loads/stores of optimizer state.
//
// Conventions (see torchrec_tt/ops/_library.py): core k is stored as
// [p_k, r_k*q_k*r_{k+1}]; one contiguous slice per row digit, row-major over
// (r_k, q_k, r_{k+1}). Viewed as a matrix, a slice is A_k (r_k x n_k) with
// n_k = q_k*r_{k+1}. The left product T_k = T_{k-1} A_k (T_{-1} = [1]) has
// shape (Q_{<k} x n_k) == (Q_{<=k} x r_{k+1}) in the same memory.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace torchrec_tt {
namespace cuda_detail {

constexpr int kMaxCores = 8;
// Threads of every block-per-item / block-per-chunk kernel.
constexpr int kThreads = 128;
// Rows of the register tile of block_gemm.
constexpr int kRT = 4;
// Scratch (acc_t elements) block_gemm needs for split-k partial sums.
constexpr int kGemmScratch = kThreads * kRT * 4;

// TT shapes, passed by value to kernels.
struct TTDims {
  int d;                  // number of cores
  int D;                  // embedding dim = prod(q)
  int64_t num_embeddings;
  int p[kMaxCores];
  int q[kMaxCores];
  int r[kMaxCores + 1];
  int n[kMaxCores];       // q_k * r_{k+1}: columns of a slice viewed as (r_k x n_k)
  int S[kMaxCores];       // r_k * q_k * r_{k+1}: slice size
  int Q[kMaxCores + 1];   // Q[k] = prod(q[0..k-1])
  int64_t pst[kMaxCores]; // stride of digit k in the row id: prod(p[k+1..d-1])
  int64_t kw[kMaxCores];  // weight of prefix digit k in the sort key: prod(p[0..k-1])
};

// One grid serving several parts (cores, sorts): blocks [first[k], first[k + 1]) serve part
// k of n. Returns this block's part and sets *rel to the block's index within it.
__device__ __forceinline__ int part_of_block(const int* first, int n, int* rel) {
  int k = 0;
  while (k + 1 < n && static_cast<int>(blockIdx.x) >= first[k + 1]) ++k;
  *rel = static_cast<int>(blockIdx.x) - first[k];
  return k;
}

// Sort key of a row id. Rows are grouped by their prefix (i_0..i_{d-2}) with the
// last digit least significant; inside the prefix the digits are reversed
// (i_{d-2} most significant), so that consecutive prefixes share the slice of
// core d-2 (the largest core of a typical 3-core table) and the items of core
// d-2 come out grouped by digit without another sort:
//   key = (sum_{k<d-1} i_k * kw[k]) * p_{d-1} + i_{d-1}.
__device__ __forceinline__ uint64_t row_key(int64_t id, const TTDims& t) {
  uint64_t pre = 0;
  int64_t rem = id;
  int64_t last = 0;
#pragma unroll
  for (int k = 0; k < kMaxCores; ++k) {
    if (k < t.d) {
      const int64_t dig = rem / t.pst[k];
      rem -= dig * t.pst[k];
      if (k < t.d - 1) {
        pre += static_cast<uint64_t>(dig * t.kw[k]);
      } else {
        last = dig;
      }
    }
  }
  return pre * static_cast<uint64_t>(t.p[t.d - 1]) + static_cast<uint64_t>(last);
}

// Prefix digit k (k < d-1) of a key's prefix (key / p_{d-1}).
__device__ __forceinline__ int prefix_digit(uint64_t pre, int k, const TTDims& t) {
  return static_cast<int>((pre / static_cast<uint64_t>(t.kw[k])) % static_cast<uint64_t>(t.p[k]));
}

// The row id of a sort key (inverse of row_key).
__device__ __forceinline__ int64_t row_of_key(uint64_t key, const TTDims& t) {
  const uint64_t pl = static_cast<uint64_t>(t.p[t.d - 1]);
  const uint64_t pre = key / pl;
  int64_t id = static_cast<int64_t>(key % pl);
  for (int k = 0; k < t.d - 1; ++k) id += static_cast<int64_t>(prefix_digit(pre, k, t)) * t.pst[k];
  return id;
}

// LFU access counting (torchrec_tt::lfu_cache_record_, reference in torchrec_tt/ops/reference.py):
// `mult` accesses of `id` in an open-addressing table of `size` slots, linear probing from
// the home slot ((id mod H) * 2654435761) mod H over at most `max_probes` slots. A slot's key
// only changes from EMPTY to an id, so a non-empty key read once is final; an empty one is
// claimed with atomicCAS. Counts are integer atomics: exact for every stored id (which of
// two contesting ids gets a slot is up to the hardware). Returns false when every probed
// slot holds another id (the accesses are not counted).
__device__ __forceinline__ bool lfu_count(
    unsigned long long* keys, unsigned long long* counts, int64_t size, int64_t max_probes, int64_t id,
    unsigned long long mult) {
  constexpr unsigned long long kEmpty = 0x7fffffffffffffffULL;
  const int64_t reduced = ((id % size) + size) % size;  // as torch's remainder for size > 0
  const int64_t home = reduced * 2654435761LL % size;    // < 2^31 * 2^32: no overflow
  for (int64_t probe = 0; probe < max_probes; ++probe) {
    const int64_t slot = (home + probe) % size;
    unsigned long long key = keys[slot];
    if (key == kEmpty) {
      key = atomicCAS(&keys[slot], kEmpty, static_cast<unsigned long long>(id));
      if (key == kEmpty) key = static_cast<unsigned long long>(id);  // claimed
    }
    if (key == static_cast<unsigned long long>(id)) {
      atomicAdd(&counts[slot], mult);
      return true;
    }
  }
  return false;
}

template <typename T>
__device__ __forceinline__ T ld_cvt(const T* p) {
  return *p;
}

// Optimizer state is read and written in its own dtype (runtime code).
enum StateDtype : int { kStateFloat = 0, kStateDouble = 1, kStateHalf = 2, kStateBFloat16 = 3 };

template <typename acc_t>
__device__ __forceinline__ acc_t load_state(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case kStateDouble:
      return static_cast<acc_t>(static_cast<const double*>(base)[i]);
    case kStateHalf:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(base)[i]));
    case kStateBFloat16:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]));
    default:
      return static_cast<acc_t>(static_cast<const float*>(base)[i]);
  }
}

template <typename acc_t>
__device__ __forceinline__ void store_state(void* base, int dtype, int64_t i, acc_t v) {
  switch (dtype) {
    case kStateDouble:
      static_cast<double*>(base)[i] = static_cast<double>(v);
      break;
    case kStateHalf:
      static_cast<c10::Half*>(base)[i] = c10::Half(static_cast<float>(v));
      break;
    case kStateBFloat16:
      static_cast<c10::BFloat16*>(base)[i] = c10::BFloat16(static_cast<float>(v));
      break;
    default:
      static_cast<float*>(base)[i] = static_cast<float>(v);
      break;
  }
}

// ---------------------------------------------------------------- block GEMM
//
// C (m x n) [+]= A (m x k) @ B (k x n), computed by all kThreads threads of the
// block, deterministic (fixed summation order), ending with __syncthreads().
//   A(i, a) = A[i*sam + a*sak]  (read by whole warps at the same i: broadcast)
//   B(a, j) = B[a*ldb + j]      (read along j by consecutive lanes)
//   C(i, j) = C[i*ldc + j]
// Each thread owns a kRT x CT register tile (CT = 4 with float4 loads of B when
// n, ldb and B are 16-byte aligned, else 1). When there are fewer tiles than
// threads the k-loop is split across threads and the partial sums are reduced
// in order through `scratch` (kGemmScratch elements). C must not alias A or B.

template <typename acc_t, int CT>
__device__ __forceinline__ void gemm_mac(
    acc_t (&acc)[kRT][CT],
    int i0,
    int j0,
    int a0,
    int a1,
    int m,
    const acc_t* __restrict__ A,
    int sam,
    int sak,
    const acc_t* __restrict__ B,
    int ldb) {
  int rows[kRT];
#pragma unroll
  for (int r = 0; r < kRT; ++r) rows[r] = min(i0 + r, m - 1) * sam;
#pragma unroll 4
  for (int a = a0; a < a1; ++a) {
    acc_t b[CT];
    if constexpr (CT == 4) {
      const float4 v = *reinterpret_cast<const float4*>(B + a * ldb + j0);
      b[0] = v.x;
      b[1] = v.y;
      b[2] = v.z;
      b[3] = v.w;
    } else {
      b[0] = B[a * ldb + j0];
    }
    const int ao = a * sak;
#pragma unroll
    for (int r = 0; r < kRT; ++r) {
      const acc_t av = A[rows[r] + ao];
#pragma unroll
      for (int c = 0; c < CT; ++c) acc[r][c] += av * b[c];
    }
  }
}

template <typename acc_t, int CT>
__device__ void gemm_impl(
    int m,
    int n,
    int k,
    const acc_t* __restrict__ A,
    int sam,
    int sak,
    const acc_t* __restrict__ B,
    int ldb,
    acc_t* __restrict__ C,
    int ldc,
    bool accumulate,
    acc_t* __restrict__ scratch) {
  const int tid = threadIdx.x;
  const int tm = (m + kRT - 1) / kRT;
  const int tn = n / CT;
  const int tiles = tm * tn;
  int ks = 1;
  if (tiles > 0 && tiles < kThreads) {
    ks = kThreads / tiles;
    if (ks > k) ks = k;
    if (ks < 1) ks = 1;
  }
  if (ks == 1) {
    for (int t = tid; t < tiles; t += kThreads) {
      const int i0 = (t / tn) * kRT, j0 = (t % tn) * CT;
      acc_t acc[kRT][CT];
#pragma unroll
      for (int r = 0; r < kRT; ++r)
#pragma unroll
        for (int c = 0; c < CT; ++c) acc[r][c] = acc_t(0);
      gemm_mac<acc_t, CT>(acc, i0, j0, 0, k, m, A, sam, sak, B, ldb);
#pragma unroll
      for (int r = 0; r < kRT; ++r) {
        if (i0 + r < m) {
#pragma unroll
          for (int c = 0; c < CT; ++c) {
            acc_t* dst = C + (i0 + r) * ldc + j0 + c;
            *dst = accumulate ? *dst + acc[r][c] : acc[r][c];
          }
        }
      }
    }
  } else {
    const int t = tid % tiles, part = tid / tiles;
    if (part < ks) {
      const int i0 = (t / tn) * kRT, j0 = (t % tn) * CT;
      const int a0 = (part * k) / ks, a1 = ((part + 1) * k) / ks;
      acc_t acc[kRT][CT];
#pragma unroll
      for (int r = 0; r < kRT; ++r)
#pragma unroll
        for (int c = 0; c < CT; ++c) acc[r][c] = acc_t(0);
      gemm_mac<acc_t, CT>(acc, i0, j0, a0, a1, m, A, sam, sak, B, ldb);
      acc_t* s = scratch + (part * tiles + t) * (kRT * CT);
#pragma unroll
      for (int r = 0; r < kRT; ++r)
#pragma unroll
        for (int c = 0; c < CT; ++c) s[r * CT + c] = acc[r][c];
    }
    __syncthreads();
    for (int e = tid; e < tiles * kRT * CT; e += kThreads) {
      const int tt = e / (kRT * CT), rc = e % (kRT * CT);
      const int i = (tt / tn) * kRT + rc / CT, j = (tt % tn) * CT + rc % CT;
      if (i < m) {
        acc_t sum = acc_t(0);
        for (int pp = 0; pp < ks; ++pp) sum += scratch[(pp * tiles + tt) * (kRT * CT) + rc];
        acc_t* dst = C + i * ldc + j;
        *dst = accumulate ? *dst + sum : sum;
      }
    }
  }
  __syncthreads();
}

template <typename acc_t>
__device__ __forceinline__ void block_gemm(
    int m,
    int n,
    int k,
    const acc_t* A,
    int sam,
    int sak,
    const acc_t* B,
    int ldb,
    acc_t* C,
    int ldc,
    bool accumulate,
    acc_t* scratch) {
  if constexpr (sizeof(acc_t) == 4) {
    const bool vec = (n % 4 == 0) && (ldb % 4 == 0) && ((reinterpret_cast<uintptr_t>(B) & 15) == 0);
    if (vec) {
      gemm_impl<acc_t, 4>(m, n, k, A, sam, sak, B, ldb, C, ldc, accumulate, scratch);
      return;
    }
  }
  gemm_impl<acc_t, 1>(m, n, k, A, sam, sak, B, ldb, C, ldc, accumulate, scratch);
}

}  // namespace cuda_detail
}  // namespace torchrec_tt
