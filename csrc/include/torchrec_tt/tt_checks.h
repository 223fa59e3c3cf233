// Host-side argument validation of the torchrec_tt ops, shared by the CPU
// (tt_embedding_bag_cpu.cpp) and CUDA (tt_embedding_bag/*.cu) kernels.
//
// The checks and their messages mirror torchrec_tt/ops/reference.py, which is
// the specification: ValueError cases use TORCH_CHECK_VALUE, an id out of
// range uses TORCH_CHECK_INDEX (IndexError), and every message names the op,
// the argument and the offending value, formatted the way Python prints it
// (dtypes as ``torch.float32``, shapes as tuples ``(3, 4)``).
//
// Two kinds of checks:
//   * metadata checks (check_tt_args, check_bag_shapes, check_lookup_indices,
//     check_grad_output, check_optimizer_state) look at shapes, dtypes,
//     devices and integer arguments only; they never read tensor data, so
//     they cost no device synchronisation;
//   * data checks (check_offsets_values, check_ids_values and their *_host
//     pointer versions) read the values of offsets / indices. The tensor
//     versions copy device tensors to the host (a sync); CUDA kernels may
//     prefer their own device-side reduction and then call the *_host
//     versions on the few values that matter, or just the tensor versions.
//
// The reference validates in this order, and kernels should too:
//   check_tt_args, check_bag_shapes, check_offsets_values, check_ids_values,
//   check_grad_output, check_optimizer_state.
// Mutating ops must finish every check before they write anything.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <string>

namespace torchrec_tt {

// Values of the ``pooling_mode`` / ``optimizer`` arguments (FBGEMM numbering),
// see torchrec_tt/ops/_library.py.
enum class PoolingMode : int64_t { SUM = 0, MEAN = 1 };
enum class FusedOptimizer : int64_t { SGD = 0, ADAGRAD = 1, ROWWISE_ADAGRAD = 2 };

namespace detail {

// ``torch.float32`` etc., as Python prints a dtype.
inline std::string py_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return "torch.float32";
    case c10::ScalarType::Double: return "torch.float64";
    case c10::ScalarType::Half: return "torch.float16";
    case c10::ScalarType::BFloat16: return "torch.bfloat16";
    case c10::ScalarType::Int: return "torch.int32";
    case c10::ScalarType::Long: return "torch.int64";
    case c10::ScalarType::Short: return "torch.int16";
    case c10::ScalarType::Char: return "torch.int8";
    case c10::ScalarType::Byte: return "torch.uint8";
    case c10::ScalarType::Bool: return "torch.bool";
    case c10::ScalarType::ComplexFloat: return "torch.complex64";
    case c10::ScalarType::ComplexDouble: return "torch.complex128";
    case c10::ScalarType::ComplexHalf: return "torch.complex32";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// A shape as Python prints ``tuple(t.shape)``: ``()``, ``(5,)``, ``(2, 3)``.
inline std::string py_tuple(c10::IntArrayRef v) {
  std::ostringstream s;
  s << '(';
  for (size_t i = 0; i < v.size(); ++i) s << (i ? ", " : "") << v[i];
  s << (v.size() == 1 ? ",)" : ")");
  return s.str();
}

// A list as Python prints ``list(x)``: ``[1, 32, 1]``.
inline std::string py_list(c10::IntArrayRef v) {
  std::ostringstream s;
  s << '[';
  for (size_t i = 0; i < v.size(); ++i) s << (i ? ", " : "") << v[i];
  s << ']';
  return s.str();
}

// prod(v), saturating at INT64_MAX (Python integers do not overflow).
inline int64_t saturating_prod(c10::IntArrayRef v) {
  int64_t out = 1;
  for (int64_t x : v) {
    int64_t next = 0;
    if (c10::mul_overflows(out, x, &next)) return std::numeric_limits<int64_t>::max();
    out = next;
  }
  return out;
}

inline bool is_index_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Int || t == c10::ScalarType::Long;
}

}  // namespace detail

// ---------------------------------------------------------------- metadata

// TT structure shared by every op (reference.check_tt_args).
inline void check_tt_args(
    const char* op,
    at::TensorList cores,
    c10::IntArrayRef p_shapes,
    c10::IntArrayRef q_shapes,
    c10::IntArrayRef ranks,
    int64_t num_embeddings) {
  const int64_t d = static_cast<int64_t>(cores.size());
  TORCH_CHECK_VALUE(d >= 1, op, ": cores must hold at least one TT core, got 0");
  TORCH_CHECK_VALUE(
      static_cast<int64_t>(p_shapes.size()) == d && static_cast<int64_t>(q_shapes.size()) == d,
      op, ": len(p_shapes)=", p_shapes.size(), " and len(q_shapes)=", q_shapes.size(),
      " must both equal the number of cores (", d, ")");
  TORCH_CHECK_VALUE(
      static_cast<int64_t>(ranks.size()) == d + 1 && ranks[0] == 1 && ranks[d] == 1,
      op, ": ranks must have d + 1 = ", d + 1, " entries starting and ending with 1, got ",
      detail::py_list(ranks));
  bool positive = true;
  for (int64_t k = 0; k < d; ++k) positive = positive && p_shapes[k] >= 1 && q_shapes[k] >= 1;
  for (int64_t r : ranks) positive = positive && r >= 1;
  TORCH_CHECK_VALUE(
      positive, op, ": p_shapes ", detail::py_list(p_shapes), ", q_shapes ", detail::py_list(q_shapes),
      " and ranks ", detail::py_list(ranks), " must be positive");
  const int64_t rows = detail::saturating_prod(p_shapes);
  TORCH_CHECK_VALUE(
      num_embeddings >= 0 && num_embeddings <= rows, op, ": num_embeddings=", num_embeddings,
      " must lie in [0, prod(p_shapes)=", rows, "]");
  for (int64_t k = 0; k < d; ++k) {
    const at::Tensor& core = cores[k];
    const int64_t cols = ranks[k] * q_shapes[k] * ranks[k + 1];
    TORCH_CHECK_VALUE(
        core.dim() == 2 && core.size(0) == p_shapes[k] && core.size(1) == cols, op, ": cores[", k,
        "] has shape ", detail::py_tuple(core.sizes()), ", expected [p_k, r_k*q_k*r_k+1] = [",
        p_shapes[k], ", ", cols, "]");
    TORCH_CHECK_VALUE(
        core.is_floating_point(), op, ": cores[", k, "] must be floating point, got ",
        detail::py_dtype(core.scalar_type()));
    TORCH_CHECK_VALUE(
        core.scalar_type() == cores[0].scalar_type() && core.device() == cores[0].device(), op,
        ": cores[", k, "] is ", detail::py_dtype(core.scalar_type()), " on ", core.device(),
        " but cores[0] is ", detail::py_dtype(cores[0].scalar_type()), " on ", cores[0].device());
  }
}

// indices / offsets / per_sample_weights / pooling_mode without reading data
// (the metadata half of reference.check_bag_args).
inline void check_bag_shapes(
    const char* op,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t pooling_mode) {
  auto check_index_tensor = [op](const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(
        t.dim() == 1 && detail::is_index_dtype(t.scalar_type()), op, ": ", name,
        " must be a 1-D int32/int64 tensor, got ", detail::py_dtype(t.scalar_type()), " of shape ",
        detail::py_tuple(t.sizes()));
  };
  check_index_tensor("indices", indices);
  check_index_tensor("offsets", offsets);
  TORCH_CHECK_VALUE(offsets.numel() >= 1, op, ": offsets must have B + 1 >= 1 entries, got 0");
  TORCH_CHECK_VALUE(
      pooling_mode == static_cast<int64_t>(PoolingMode::SUM) ||
          pooling_mode == static_cast<int64_t>(PoolingMode::MEAN),
      op, ": pooling_mode must be 0 (sum) or 1 (mean), got ", pooling_mode);
  if (per_sample_weights.has_value() && per_sample_weights->defined()) {
    const at::Tensor& w = *per_sample_weights;
    TORCH_CHECK_VALUE(
        w.dim() == 1 && w.numel() == indices.numel() && w.is_floating_point(), op,
        ": per_sample_weights must be a 1-D floating tensor with one weight per index (",
        indices.numel(), "), got ", detail::py_dtype(w.scalar_type()), " of shape ",
        detail::py_tuple(w.sizes()));
  }
}

// The indices argument of tt_lookup_rows (no data access).
inline void check_lookup_indices(const char* op, const at::Tensor& indices) {
  TORCH_CHECK_VALUE(
      indices.dim() == 1 && detail::is_index_dtype(indices.scalar_type()), op,
      ": indices must be a 1-D int32/int64 tensor, got ", detail::py_dtype(indices.scalar_type()), " ",
      detail::py_tuple(indices.sizes()));
}

// grad_output must be (B, D) with B = offsets.numel() - 1, D = prod(q_shapes).
inline void check_grad_output(
    const char* op, const at::Tensor& grad_output, const at::Tensor& offsets, c10::IntArrayRef q_shapes) {
  const int64_t num_bags = offsets.numel() - 1;
  const int64_t dim = detail::saturating_prod(q_shapes);
  TORCH_CHECK_VALUE(
      grad_output.dim() == 2 && grad_output.size(0) == num_bags && grad_output.size(1) == dim, op,
      ": grad_output has shape ", detail::py_tuple(grad_output.sizes()), ", expected (B, D) = (", num_bags,
      ", ", dim, ")");
}

// Optimizer id and state tensors of the fused op (reference.check_optimizer_state).
inline void check_optimizer_state(
    const char* op, at::TensorList cores, at::TensorList optimizer_state, int64_t optimizer) {
  TORCH_CHECK_VALUE(
      optimizer >= static_cast<int64_t>(FusedOptimizer::SGD) &&
          optimizer <= static_cast<int64_t>(FusedOptimizer::ROWWISE_ADAGRAD),
      op, ": unknown optimizer ", optimizer, "; expected one of [0, 1, 2]");
  if (optimizer == static_cast<int64_t>(FusedOptimizer::SGD)) {
    TORCH_CHECK_VALUE(
        optimizer_state.empty(), op, ": SGD takes no optimizer_state, got ", optimizer_state.size(),
        " tensors");
    return;
  }
  TORCH_CHECK_VALUE(
      optimizer_state.size() == cores.size(), op, ": optimizer_state needs one tensor per core (",
      cores.size(), "), got ", optimizer_state.size());
  const bool adagrad = optimizer == static_cast<int64_t>(FusedOptimizer::ADAGRAD);
  for (size_t k = 0; k < cores.size(); ++k) {
    const at::Tensor& core = cores[k];
    const at::Tensor& state = optimizer_state[k];
    const bool shape_ok = adagrad ? state.sizes() == core.sizes()
                                  : (state.dim() == 1 && state.size(0) == core.size(0));
    if (shape_ok && state.device() == core.device() && state.is_floating_point()) {
      continue;  // the message below is only built for a failing check
    }
    const std::string expected =
        adagrad ? detail::py_tuple(core.sizes()) : detail::py_tuple({core.size(0)});
    TORCH_CHECK_VALUE(
        false, op,
        ": optimizer_state[", k, "] must be a floating tensor of shape ", expected, " on ", core.device(),
        ", got ", detail::py_dtype(state.scalar_type()), " ", detail::py_tuple(state.sizes()), " on ",
        state.device());
  }
}

// -------------------------------------------------------------------- data

// offsets[0] == 0, offsets[n-1] == num_indices, non-decreasing (host pointer).
template <typename index_t>
inline void check_offsets_host(const char* op, const index_t* offsets, int64_t n, int64_t num_indices) {
  const int64_t first = static_cast<int64_t>(offsets[0]);
  const int64_t last = static_cast<int64_t>(offsets[n - 1]);
  TORCH_CHECK_VALUE(
      first == 0 && last == num_indices, op, ": offsets must start at 0 and end at indices.numel()=",
      num_indices, ", got offsets[0]=", first, ", offsets[-1]=", last);
  for (int64_t b = 0; b + 1 < n; ++b) {
    TORCH_CHECK_VALUE(
        offsets[b] <= offsets[b + 1], op, ": offsets must be non-decreasing, but offsets[", b,
        "]=", static_cast<int64_t>(offsets[b]), " > offsets[", b + 1,
        "]=", static_cast<int64_t>(offsets[b + 1]));
  }
}

// Every id in [0, num_embeddings); names the first offending position (host pointer).
template <typename index_t>
inline void check_ids_host(const char* op, const index_t* ids, int64_t n, int64_t num_embeddings) {
  // Branch-free scan first (vectorisable), the position only on failure.
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = static_cast<int64_t>(ids[i]);
    ok &= (v >= 0) & (v < num_embeddings);
  }
  if (ok) return;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = static_cast<int64_t>(ids[i]);
    TORCH_CHECK_INDEX(
        v >= 0 && v < num_embeddings, op, ": indices[", i, "]=", v, " is out of range [0, num_embeddings=",
        num_embeddings, ")");
  }
}

// Tensor versions: 1-D int32/int64 tensors (checked by check_bag_shapes /
// check_lookup_indices first); device tensors are copied to the host.
inline void check_offsets_values(const char* op, const at::Tensor& offsets, int64_t num_indices) {
  const at::Tensor host = offsets.is_cpu() ? offsets.contiguous() : offsets.cpu().contiguous();
  if (host.scalar_type() == c10::ScalarType::Int) {
    check_offsets_host(op, host.const_data_ptr<int32_t>(), host.numel(), num_indices);
  } else {
    check_offsets_host(op, host.const_data_ptr<int64_t>(), host.numel(), num_indices);
  }
}

inline void check_ids_values(const char* op, const at::Tensor& indices, int64_t num_embeddings) {
  if (indices.numel() == 0) return;
  const at::Tensor host = indices.is_cpu() ? indices.contiguous() : indices.cpu().contiguous();
  if (host.scalar_type() == c10::ScalarType::Int) {
    check_ids_host(op, host.const_data_ptr<int32_t>(), host.numel(), num_embeddings);
  } else {
    check_ids_host(op, host.const_data_ptr<int64_t>(), host.numel(), num_embeddings);
  }
}

// check_bag_shapes + check_offsets_values + check_ids_values: the whole of
// reference.check_bag_args, in its order.
inline void check_bag_args(
    const char* op,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t num_embeddings,
    int64_t pooling_mode) {
  check_bag_shapes(op, indices, offsets, per_sample_weights, pooling_mode);
  check_offsets_values(op, offsets, indices.numel());
  check_ids_values(op, indices, num_embeddings);
}

}  // namespace torchrec_tt
