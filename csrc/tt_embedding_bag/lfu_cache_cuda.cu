// CUDA kernel of torchrec_tt::lfu_cache_record_ (the access counting of the LFU row
// cache, torchrec_tt/modules/tt_cache.py; reference: torchrec_tt/ops/reference.py).
//
// One thread per id, equal ids of a warp merged first (the lowest lane counts them all:
// hot ids under skewed traffic would otherwise contend for one counter); the probing is
// cuda_detail::lfu_count (tt_cuda_common.cuh). No host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "tt_cuda_common.cuh"

namespace torchrec_tt {
namespace {

using u64 = unsigned long long;

template <typename index_t>
__global__ void lfu_record_kernel(
    u64* __restrict__ keys,
    u64* __restrict__ counts,
    const index_t* __restrict__ ids,
    int64_t num_ids,
    int64_t size,
    int64_t max_probes,
    u64* __restrict__ dropped) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_ids; i += stride) {
    const int64_t id = static_cast<int64_t>(ids[i]);
    const unsigned peers = __match_any_sync(__activemask(), static_cast<u64>(id));
    if (static_cast<int>(threadIdx.x & 31) != __ffs(peers) - 1) continue;
    const u64 mult = static_cast<u64>(__popc(peers));
    if (!cuda_detail::lfu_count(keys, counts, size, max_probes, id, mult)) atomicAdd(dropped, mult);
  }
}

at::Tensor lfu_cache_record_cuda(at::Tensor& hash_keys, at::Tensor& hash_counts, const at::Tensor& ids, int64_t max_probes) {
  TORCH_CHECK(
      hash_keys.is_cuda() && hash_counts.is_cuda() && ids.is_cuda(),
      "torchrec_tt.lfu_cache_record_: hash_keys, hash_counts and ids must be CUDA tensors");
  TORCH_CHECK(
      hash_keys.scalar_type() == at::kLong && hash_counts.scalar_type() == at::kLong &&
          hash_keys.sizes() == hash_counts.sizes() && hash_keys.is_contiguous() && hash_counts.is_contiguous(),
      "torchrec_tt.lfu_cache_record_: hash_keys and hash_counts must be contiguous int64 tensors of one shape");
  TORCH_CHECK(
      ids.dim() == 1 && (ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt),
      "torchrec_tt.lfu_cache_record_: ids must be a 1-D int32/int64 tensor");
  TORCH_CHECK(max_probes >= 1, "torchrec_tt.lfu_cache_record_: max_probes must be >= 1, got ", max_probes);
  c10::cuda::CUDAGuard guard(hash_keys.device());
  auto dropped = at::zeros({1}, hash_keys.options());
  const int64_t num_ids = ids.numel();
  const int64_t size = hash_keys.numel();
  if (num_ids == 0) {
    return dropped;
  }
  if (size == 0) {
    dropped.fill_(num_ids);
    return dropped;
  }
  const auto ids_c = ids.contiguous();
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((num_ids + kThreads - 1) / kThreads, 65535LL * 8);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(ids_c.scalar_type(), "lfu_cache_record_cuda", [&] {
    lfu_record_kernel<index_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        reinterpret_cast<u64*>(hash_keys.data_ptr<int64_t>()),
        reinterpret_cast<u64*>(hash_counts.data_ptr<int64_t>()),
        ids_c.data_ptr<index_t>(),
        num_ids,
        size,
        max_probes,
        reinterpret_cast<u64*>(dropped.data_ptr<int64_t>()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dropped;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchrec_tt, CUDA, m) {
  m.impl("lfu_cache_record_", &lfu_cache_record_cuda);
}

}  // namespace torchrec_tt
