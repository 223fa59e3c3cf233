// What a slice-gradient reduction does with a finished slice gradient (the CUDA TT
// embedding-bag kernels, tt_embedding_bag_cuda.cu and tt_cuda_fast.cuh): write it, or
// apply SGD / Adagrad / row-wise Adagrad to the core slice in place. Either from a
// gradient in shared memory (finalize_slice) or from one held in the registers of a
// block's threads (finalize_held). Every sum in a fixed order: deterministic.
#pragma once

#include <cstdint>

#include "tt_cuda_common.cuh"

namespace torchrec_tt {
namespace cuda_detail {

enum FinalMode : int { kWriteGrad = 0, kSGD = 1, kAdagrad = 2, kRowwiseAdagrad = 3 };

// One core's slice-gradient reduction (the fields after `mode` say what finalising does).
template <typename scalar_t, typename acc_t>
struct ReduceArgs {
  int S, rk, nk, Q;
  const int32_t* count;     // device count of items
  const int32_t* digits;    // digit per sorted item
  const int32_t* perm;      // sorted position -> item (null: identity)
  const acc_t* tbuf;        // T per item; with tdig: the core whose slice tdig[item] is T
  const int32_t* tdig;      // null, or the digit of the previous core per item (fast path,
                            // loaded with the chunk's items: no extra latency per staging)
  const acc_t* dtbuf;
  acc_t* pf;                // per chunk: partial of a run begun in an earlier chunk
  acc_t* pl;                // per chunk: partial of a run that goes on in later chunks
  int mode;
  scalar_t* grad;
  scalar_t* core;
  void* state;
  int state_dtype;
  acc_t lr, eps;
  int sm_acc, sm_ts, sm_dts, sm_scratch, sm_red;
  // runs that go on past their first chunk, listed for the tail kernel: (entry, chunk)
  int entry;                // this reduction's entry in the tail launch
  int2* cross;              // [cross_cap]
  int32_t* ncross;          // device count of listed runs (zero before the first writer)
  int cross_cap;
};

// Lists a run whose first partial chunk blk wrote to pl (one thread per run). The order
// of the list is free: the tail kernel sums every listed run alike, in chunk order.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void list_crossing_run(const ReduceArgs<scalar_t, acc_t>& a, int blk) {
  const int slot = atomicAdd(a.ncross, 1);
  CUDA_KERNEL_ASSERT(slot < a.cross_cap);
  a.cross[slot] = make_int2(a.entry, blk);
}

// Elements per thread whose global loads a slice loop issues together (one memory
// latency per kUnroll elements instead of one per element: a middle-core slice has
// 4096 elements, 32 per thread).
constexpr int kUnroll = 4;

// Row-wise Adagrad: the slice's state += mean of its squared gradient (`part`: this
// thread's sum of squares; the NT threads of the block, red: NT + 1 elements).
// Returns sqrt(state) + eps, the slice's one denominator, to every thread.
template <int NT, typename scalar_t, typename acc_t>
__device__ acc_t rowwise_denominator(const ReduceArgs<scalar_t, acc_t>& a, int dg, acc_t part, acc_t* red) {
  const int tid = threadIdx.x;
  red[tid] = part;
  __syncthreads();
  for (int s = NT / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] += red[tid + s];
    __syncthreads();
  }
  if (tid == 0) {
    const acc_t s = load_state<acc_t>(a.state, a.state_dtype, dg) + red[0] / static_cast<acc_t>(a.S);
    store_state<acc_t>(a.state, a.state_dtype, dg, s);
    red[NT] = s;
  }
  __syncthreads();
  return sqrt(red[NT]) + a.eps;
}

// The update of the first n (<= N) elements base + off[j] with gradients g[j] (den: the
// row-wise Adagrad denominator). All loads are issued before the first store.
template <int N, typename scalar_t, typename acc_t>
__device__ __forceinline__ void update_elements(
    const ReduceArgs<scalar_t, acc_t>& a, int64_t base, const int (&off)[N], const acc_t (&g)[N], int n, acc_t den) {
  acc_t w[N], st[N];
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (j < n) {
      w[j] = static_cast<acc_t>(a.core[base + off[j]]);
      if (a.mode == kAdagrad) st[j] = load_state<acc_t>(a.state, a.state_dtype, base + off[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (j >= n) continue;
    const int64_t i = base + off[j];
    if (a.mode == kSGD) {
      a.core[i] = static_cast<scalar_t>(w[j] - a.lr * g[j]);
    } else if (a.mode == kAdagrad) {
      const acc_t s = st[j] + g[j] * g[j];
      store_state<acc_t>(a.state, a.state_dtype, i, s);
      a.core[i] = static_cast<scalar_t>(w[j] - a.lr * g[j] / (sqrt(s) + a.eps));
    } else {
      a.core[i] = static_cast<scalar_t>(w[j] - a.lr * g[j] / den);
    }
  }
}

// The slice `dg` of the core gets its gradient g (S values in shared memory), once.
// All kThreads threads of the block call it.
template <typename scalar_t, typename acc_t>
__device__ void finalize_slice(const ReduceArgs<scalar_t, acc_t>& a, int dg, const acc_t* g, acc_t* red) {
  const int tid = threadIdx.x;
  const int64_t base = static_cast<int64_t>(dg) * a.S;
  if (a.mode == kWriteGrad) {
    for (int e = tid; e < a.S; e += kThreads) a.grad[base + e] = static_cast<scalar_t>(g[e]);
    return;
  }
  acc_t den = acc_t(1);
  if (a.mode == kRowwiseAdagrad) {
    acc_t part = acc_t(0);
    for (int e = tid; e < a.S; e += kThreads) part += g[e] * g[e];
    den = rowwise_denominator<kThreads>(a, dg, part, red);
  }
  for (int e0 = tid; e0 < a.S; e0 += kThreads * kUnroll) {
    int off[kUnroll];
    acc_t ge[kUnroll];
    int n = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      off[u] = e0 + u * kThreads;
      if (off[u] < a.S) n = u + 1;
      ge[u] = off[u] < a.S ? g[off[u]] : acc_t(0);
    }
    update_elements<kUnroll>(a, base, off, ge, n, den);
  }
}

// The slice `dg` gets its gradient from the registers of the block's NT threads: each
// holds N elements, g[j] at offset off[j] of the slice, and each element is held once.
// All NT threads call it.
template <int NT, int N, typename scalar_t, typename acc_t>
__device__ void finalize_held(
    const ReduceArgs<scalar_t, acc_t>& a, int dg, const int (&off)[N], const acc_t (&g)[N], acc_t* red) {
  const int64_t base = static_cast<int64_t>(dg) * a.S;
  if (a.mode == kWriteGrad) {
#pragma unroll
    for (int j = 0; j < N; ++j) a.grad[base + off[j]] = static_cast<scalar_t>(g[j]);
    return;
  }
  acc_t den = acc_t(1);
  if (a.mode == kRowwiseAdagrad) {
    acc_t part = acc_t(0);
#pragma unroll
    for (int j = 0; j < N; ++j) part += g[j] * g[j];
    den = rowwise_denominator<NT>(a, dg, part, red);
  }
  static_assert(N % kUnroll == 0, "held elements in groups of kUnroll");
#pragma unroll
  for (int j0 = 0; j0 < N; j0 += kUnroll) {  // kUnroll at a time: fewer registers
    int o[kUnroll];
    acc_t v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      o[u] = off[j0 + u];
      v[u] = g[j0 + u];
    }
    update_elements<kUnroll>(a, base, o, v, kUnroll, den);
  }
}

}  // namespace cuda_detail
}  // namespace torchrec_tt
