// CPU kernels of the TT embedding-bag ops (namespace ``torchrec_tt``):
//
//   tt_embedding_bag_forward, tt_embedding_bag_backward,
//   tt_embedding_bag_backward_fused_, tt_lookup_rows
//
// Semantics, validation and error messages follow the reference kernels in
// torchrec_tt/ops/reference.py; schemas live in torchrec_tt/ops/_library.py.
//
// Layout (see _library.py): core k is [p_k, r_k * q_k * r_{k+1}], one slice
// A_k[i_k] = (r_k, q_k, r_{k+1}) row-major per digit i_k; row digits are mixed
// radix p with i_0 the most significant. Q_{<k} = q_0 ... q_{k-1},
// Q_{>k} = q_{k+1} ... q_{d-1}, D = prod(q).
//
// Arithmetic runs in the accumulation type acc_t (float for half/bfloat16
// cores, the cores' type otherwise). Results never depend on the thread count:
// every output element is produced by exactly one task, in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "torchrec_tt/tt_checks.h"

#if defined(__GNUC__) || defined(__clang__)
#define TT_INLINE inline __attribute__((always_inline))
#define TT_RESTRICT __restrict__
#else
#define TT_INLINE inline
#define TT_RESTRICT
#endif

namespace torchrec_tt {
namespace {

constexpr const char* kForwardOp = "torchrec_tt.tt_embedding_bag_forward";
constexpr const char* kBackwardOp = "torchrec_tt.tt_embedding_bag_backward";
constexpr const char* kFusedOp = "torchrec_tt.tt_embedding_bag_backward_fused_";
constexpr const char* kLookupOp = "torchrec_tt.tt_lookup_rows";

// ------------------------------------------------------------------ shapes

// Derived sizes of a TT table; all int64 (nnz * D and p_k * S_k may exceed int32).
struct TTLayout {
  int64_t d = 0;
  int64_t D = 1;          // embedding dim, prod(q)
  int64_t sum_S = 0;      // sum_k S_k
  int64_t max_chain = 1;  // largest intermediate T_k = (Q_{<=k}, r_{k+1}) of the row chain
  int64_t left_size = 0, right_size = 0, max_m = 1, max_rt = 1;  // backward scratch
  int64_t kb = 0;         // the "big" core (largest slice): work is ordered by its digit
  int64_t kb_stride = 1;  // digit_kb(id) = (id / kb_stride) % p[kb]
  std::vector<int64_t> p, q, r, S, S_off, Qlt, Qgt, L_off, R_off;

  TTLayout(c10::IntArrayRef p_shapes, c10::IntArrayRef q_shapes, c10::IntArrayRef ranks)
      : d(static_cast<int64_t>(p_shapes.size())),
        p(p_shapes.begin(), p_shapes.end()),
        q(q_shapes.begin(), q_shapes.end()),
        r(ranks.begin(), ranks.end()) {
    S.resize(d);
    S_off.resize(d);
    Qlt.assign(d + 1, 1);
    Qgt.assign(d, 1);
    for (int64_t k = 0; k < d; ++k) {
      S[k] = r[k] * q[k] * r[k + 1];
      S_off[k] = sum_S;
      sum_S += S[k];
      Qlt[k + 1] = Qlt[k] * q[k];
    }
    D = Qlt[d];
    for (int64_t k = d - 2; k >= 0; --k) Qgt[k] = Qgt[k + 1] * q[k + 1];
    max_chain = D;
    for (int64_t k = 1; k < d; ++k) max_chain = std::max(max_chain, Qlt[k + 1] * r[k + 1]);
    // Left products L_k = (Q_{<k}, r_k) stored for k >= 2; right products
    // R_k = (r_{k+1}, Q_{>k}) stored for k <= d - 3.
    L_off.assign(d, 0);
    for (int64_t k = 2; k < d; ++k) {
      L_off[k] = left_size;
      left_size += Qlt[k] * r[k];
    }
    R_off.assign(d, 0);
    for (int64_t k = 0; k + 3 <= d; ++k) {
      R_off[k] = right_size;
      right_size += r[k + 1] * Qgt[k];
    }
    for (int64_t k = 0; k < d; ++k) {
      max_m = std::max(max_m, r[k] * q[k] * Qgt[k]);
      max_rt = std::max(max_rt, Qgt[k] * r[k + 1]);
    }
    for (int64_t k = 1; k < d; ++k)
      if (S[k] > S[kb]) kb = k;
    for (int64_t k = kb + 1; k < d; ++k) kb_stride *= p[k];
  }

  int64_t big_digit(int64_t id) const {
    return (id / kb_stride) % p[kb];
  }
};

// --------------------------------------------------------- small kernels
//
// The only heavy loop is the small matrix product ``mm``. It is compiled three
// times (baseline SSE2, AVX2+FMA, AVX-512) and picked at run time from
// at::get_cpu_capability(), so it honours ATEN_CPU_CAPABILITY=default|avx2
// like ATen's own kernels. Everything else is baseline code.

// C[M x N] = A[M x K] @ B[K x N], or C += A @ B when ``accumulate``.
// A(m, k) = A[m * sam + k * sak] (so products with A^T are free); B and C
// row-major with N columns, unaliased. Each element of A @ B is one chain
// over k = 0..K-1 in order (then added to C when accumulating).
template <typename T>
using MmFn = void (*)(
    int64_t M, int64_t K, int64_t N, const T* A, int64_t sam, int64_t sak, const T* B, T* C, bool accumulate);

#if defined(__GNUC__) || defined(__clang__)
// GCC/Clang generic vectors of VB bytes (lowered to the enclosing function's ISA).
template <typename T, int VB>
struct VecOf;
#define TT_VEC(T, VB)                                        \
  template <>                                                \
  struct VecOf<T, VB> {                                      \
    typedef T type __attribute__((vector_size(VB)));         \
  };
TT_VEC(float, 16)
TT_VEC(float, 32)
TT_VEC(float, 64)
TT_VEC(double, 16)
TT_VEC(double, 32)
TT_VEC(double, 64)
#undef TT_VEC

// One MR x (NV vectors) tile of C, accumulators held in registers.
template <int MR, int NV, int VB, typename T>
TT_INLINE void mm_tile(
    int64_t K, const T* TT_RESTRICT A, int64_t sam, int64_t sak, const T* TT_RESTRICT B, int64_t N,
    T* TT_RESTRICT C, bool accumulate) {
  using V = typename VecOf<T, VB>::type;
  constexpr int W = VB / static_cast<int>(sizeof(T));
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = V{};
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * N;
    V bv[NV];
    for (int j = 0; j < NV; ++j) std::memcpy(&bv[j], b + j * W, VB);
    for (int i = 0; i < MR; ++i) {
      const T a = A[i * sam + k * sak];
      for (int j = 0; j < NV; ++j) acc[i][j] += a * bv[j];
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NV; ++j) {
      if (accumulate) {
        V c;
        std::memcpy(&c, C + i * N + j * W, VB);
        acc[i][j] = c + acc[i][j];
      }
      std::memcpy(C + i * N + j * W, &acc[i][j], VB);
    }
  }
}

// One MR x 1 column of C (scalar accumulators).
template <int MR, typename T>
TT_INLINE void mm_tile1(
    int64_t K, const T* TT_RESTRICT A, int64_t sam, int64_t sak, const T* TT_RESTRICT B, int64_t N,
    T* TT_RESTRICT C, bool accumulate) {
  T acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T b = B[k * N];
    for (int i = 0; i < MR; ++i) acc[i] += A[i * sam + k * sak] * b;
  }
  for (int i = 0; i < MR; ++i) C[i * N] = accumulate ? C[i * N] + acc[i] : acc[i];
}

// All rows of one block of columns: MR-row tiles, then single rows.
template <int MR, int NV, int VB, typename T>
TT_INLINE void mm_cols(
    int64_t M, int64_t K, int64_t N, const T* A, int64_t sam, int64_t sak, const T* B, T* C, bool acc) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) mm_tile<MR, NV, VB>(K, A + m * sam, sam, sak, B, N, C + m * N, acc);
  for (; m < M; ++m) mm_tile<1, NV, VB>(K, A + m * sam, sam, sak, B, N, C + m * N, acc);
}

// Column blocks of 2 vectors (4 x 2 tiles), then 1, 1/2, 1/4 vector (8 x 1
// tiles), then single columns; ~8 independent accumulator chains per tile.
template <int VB, typename T>
TT_INLINE void mm_impl(
    int64_t M, int64_t K, int64_t N, const T* A, int64_t sam, int64_t sak, const T* B, T* C, bool acc) {
  constexpr int64_t W = VB / static_cast<int64_t>(sizeof(T));
  int64_t n = 0;
  for (; n + 2 * W <= N; n += 2 * W) mm_cols<4, 2, VB>(M, K, N, A, sam, sak, B + n, C + n, acc);
  if (n + W <= N) {
    mm_cols<8, 1, VB>(M, K, N, A, sam, sak, B + n, C + n, acc);
    n += W;
  }
  if constexpr (VB >= 32) {
    if (n + W / 2 <= N) {
      mm_cols<8, 1, VB / 2>(M, K, N, A, sam, sak, B + n, C + n, acc);
      n += W / 2;
    }
  }
  if constexpr (VB >= 64) {
    if (n + W / 4 <= N) {
      mm_cols<8, 1, VB / 4>(M, K, N, A, sam, sak, B + n, C + n, acc);
      n += W / 4;
    }
  }
  for (; n < N; ++n) {
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) mm_tile1<8>(K, A + m * sam, sam, sak, B + n, N, C + m * N + n, acc);
    for (; m < M; ++m) mm_tile1<1>(K, A + m * sam, sam, sak, B + n, N, C + m * N + n, acc);
  }
}
#else  // portable fallback
template <int VB, typename T>
TT_INLINE void mm_impl(
    int64_t M, int64_t K, int64_t N, const T* A, int64_t sam, int64_t sak, const T* B, T* C, bool acc) {
  for (int64_t m = 0; m < M; ++m) {
    T* c = C + m * N;
    for (int64_t n = 0; n < N; ++n) {
      T sum = T(0);
      for (int64_t k = 0; k < K; ++k) sum += A[m * sam + k * sak] * B[k * N + n];
      c[n] = acc ? c[n] + sum : sum;
    }
  }
}
#endif

template <typename T>
void mm_default(int64_t M, int64_t K, int64_t N, const T* A, int64_t sam, int64_t sak, const T* B, T* C, bool acc) {
  mm_impl<16>(M, K, N, A, sam, sak, B, C, acc);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TT_HAVE_X86_VARIANTS 1
template <typename T>
__attribute__((target("avx2,fma"))) void mm_avx2(
    int64_t M, int64_t K, int64_t N, const T* A, int64_t sam, int64_t sak, const T* B, T* C, bool acc) {
  mm_impl<32>(M, K, N, A, sam, sak, B, C, acc);
}
template <typename T>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))) void mm_avx512(
    int64_t M, int64_t K, int64_t N, const T* A, int64_t sam, int64_t sak, const T* B, T* C, bool acc) {
  mm_impl<64>(M, K, N, A, sam, sak, B, C, acc);
}
#endif

enum class Isa { kDefault, kAvx2, kAvx512 };

Isa detect_isa() {
#ifdef TT_HAVE_X86_VARIANTS
  const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  if (cap == "AVX512" && avx512) return Isa::kAvx512;
  if ((cap == "AVX512" || cap == "AVX2") && avx2) return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

template <typename T>
MmFn<T> pick_mm() {
  static const Isa isa = detect_isa();
#ifdef TT_HAVE_X86_VARIANTS
  if (isa == Isa::kAvx512) return &mm_avx512<T>;
  if (isa == Isa::kAvx2) return &mm_avx2<T>;
#endif
  return &mm_default<T>;
}

// Digits (i_0 most significant) of a row id.
TT_INLINE void row_digits(int64_t id, const int64_t* p, int64_t d, int64_t* digit) {
  for (int64_t k = d - 1; k >= 0; --k) {
    digit[k] = id % p[k];
    id /= p[k];
  }
}

// Slice A_k[digit] in acc_t: a pointer into the core, or converted into conv.
template <typename scalar_t, typename acc_t>
TT_INLINE const acc_t* load_slice(const scalar_t* core, int64_t digit, int64_t S, acc_t* conv) {
  const scalar_t* src = core + digit * S;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t i = 0; i < S; ++i) conv[i] = static_cast<acc_t>(src[i]);
    return conv;
  }
}

// Per-task scratch: slice pointers/conversions and the chain buffers.
template <typename scalar_t, typename acc_t>
struct RowScratch {
  std::vector<int64_t> digit;
  std::vector<const acc_t*> A;
  std::vector<acc_t> conv, buf0, buf1;

  explicit RowScratch(const TTLayout& L) : digit(L.d), A(L.d), buf0(L.max_chain), buf1(L.max_chain) {
    if constexpr (!std::is_same_v<scalar_t, acc_t>) conv.resize(L.sum_S);
  }

  // Points A[k] at the slices of row ``id``.
  TT_INLINE void load(const TTLayout& L, const scalar_t* const* cores, int64_t id) {
    row_digits(id, L.p.data(), L.d, digit.data());
    for (int64_t k = 0; k < L.d; ++k) A[k] = load_slice(cores[k], digit[k], L.S[k], conv.data() + L.S_off[k]);
  }
};

// Row chain: T_0 = A_0 (q_0, r_1); T_k = T_{k-1} (Q_{<k}, r_k) @ A_k (r_k, q_k r_{k+1}).
// tt_prefix returns T_{d-2} (A_0, or one of the buffers), tt_row_of_prefix ends the
// chain, tt_row does both.
template <typename acc_t>
TT_INLINE const acc_t* tt_prefix(const TTLayout& L, MmFn<acc_t> mm, const acc_t* const* A, acc_t* buf0, acc_t* buf1) {
  const acc_t* T = A[0];
  for (int64_t k = 1; k < L.d - 1; ++k) {
    acc_t* dst = (k & 1) ? buf0 : buf1;
    mm(L.Qlt[k], L.r[k], L.q[k] * L.r[k + 1], T, L.r[k], int64_t{1}, A[k], dst, false);
    T = dst;
  }
  return T;
}

template <typename acc_t>
TT_INLINE void tt_row_of_prefix(const TTLayout& L, MmFn<acc_t> mm, const acc_t* P, const acc_t* A_last, acc_t* row) {
  const int64_t k = L.d - 1;  // d >= 2
  mm(L.Qlt[k], L.r[k], L.q[k] * L.r[k + 1], P, L.r[k], int64_t{1}, A_last, row, false);
}

template <typename acc_t>
TT_INLINE void tt_row(
    const TTLayout& L, MmFn<acc_t> mm, const acc_t* const* A, acc_t* buf0, acc_t* buf1, acc_t* row) {
  if (L.d == 1) {
    std::memcpy(row, A[0], sizeof(acc_t) * L.D);
    return;
  }
  tt_row_of_prefix(L, mm, tt_prefix(L, mm, A, buf0, buf1), A[L.d - 1], row);
}

// Slice gradients of one row: outs[k][0 .. S_k) = L_k^T g R_k^T (``+=`` for
// k == acc_core, ``=`` otherwise) for every
// k, with L_k = (Q_{<k}, r_k) the left product of cores < k and
// R_k = (r_{k+1}, Q_{>k}) the right product of cores > k (reference._core_gradients).
// bt_kb: the transposed slice of core kb (transpose_slice), or null; rt_last: the
// transpose of R_{d-2} = A_{d-1} (Q_{>d-2}, r_{d-1}), or null (both: shared by a run
// of rows with the same digit, transposed once for it).
template <typename acc_t>
struct GradScratch {
  std::vector<const acc_t*> lp, rp, rtp;
  std::vector<acc_t> lbuf, rbuf, mbuf, rt, rt_kb, rt_prev, g;
  acc_t one = acc_t(1);

  explicit GradScratch(const TTLayout& L)
      : lp(L.d),
        rp(L.d),
        rtp(L.d),
        lbuf(L.left_size),
        rbuf(L.right_size),
        mbuf(L.max_m),
        rt(L.max_rt),
        rt_kb(L.max_rt),
        rt_prev(L.max_rt),
        g(L.D) {}
};

// dst (cols x rows) = src (rows x cols)^T, converted to dst's type.
template <typename src_t, typename dst_t>
TT_INLINE void transpose(const src_t* TT_RESTRICT src, int64_t rows, int64_t cols, dst_t* TT_RESTRICT dst) {
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t i = 0; i < rows; ++i) dst[j * rows + i] = static_cast<dst_t>(src[i * cols + j]);
}

// bt[j][b][a] = A[a][j][b] for a slice A (r_k, q_k, r_{k+1}) of core k.
template <typename acc_t>
TT_INLINE void transpose_slice(const TTLayout& L, int64_t k, const acc_t* TT_RESTRICT A, acc_t* TT_RESTRICT bt) {
  const int64_t ra = L.r[k], qk = L.q[k], rb = L.r[k + 1];
  for (int64_t j = 0; j < qk; ++j)
    for (int64_t b = 0; b < rb; ++b)
      for (int64_t a = 0; a < ra; ++a) bt[(j * rb + b) * ra + a] = A[(a * qk + j) * rb + b];
}

template <typename acc_t>
TT_INLINE void tt_slice_grads(
    const TTLayout& L,
    MmFn<acc_t> mm,
    const acc_t* const* A,
    const acc_t* g,
    GradScratch<acc_t>& s,
    acc_t* const* outs,
    int64_t acc_core,
    const acc_t* bt_kb,
    const acc_t* rt_last = nullptr) {
  const int64_t d = L.d;
  if (d == 1) {
    if (acc_core == 0) {
      for (int64_t j = 0; j < L.D; ++j) outs[0][j] += g[j];
    } else {
      std::memcpy(outs[0], g, sizeof(acc_t) * L.D);
    }
    return;
  }
  const int64_t* r = L.r.data();
  const int64_t* q = L.q.data();
  s.lp[0] = &s.one;
  s.lp[1] = A[0];
  for (int64_t k = 2; k < d; ++k) {
    acc_t* dst = s.lbuf.data() + L.L_off[k];
    mm(L.Qlt[k - 1], r[k - 1], q[k - 1] * r[k], s.lp[k - 1], r[k - 1], int64_t{1}, A[k - 1], dst, false);
    s.lp[k] = dst;
  }
  s.rp[d - 1] = &s.one;
  s.rp[d - 2] = A[d - 1];  // (r_{d-1}, q_{d-1})
  std::fill(s.rtp.begin(), s.rtp.end(), nullptr);
  if (rt_last != nullptr) s.rtp[d - 2] = rt_last;  // R_{d-2}^T, given
  for (int64_t k = d - 2; k >= 1; --k) {
    if (k == L.kb && bt_kb != nullptr) {
      // A_k @ R_k is narrow (N = Q_{>k}) for k near the end; compute its
      // transpose instead, from the transposed slice bt_kb, as q_k wide products
      // RT_{k-1}[(j, c), a] = sum_b RT_k[c, b] A_k[a, j, b] (same products, same
      // order over b: the same bits as the direct product).
      const int64_t Q = L.Qgt[k], ra = r[k], rb = r[k + 1];
      acc_t* rtk = s.rt_kb.data();
      transpose(s.rp[k], rb, Q, rtk);
      s.rtp[k] = rtk;
      acc_t* prev = s.rt_prev.data();
      for (int64_t j = 0; j < q[k]; ++j)
        mm(Q, rb, ra, rtk, rb, int64_t{1}, bt_kb + j * rb * ra, prev + j * Q * ra, false);
      s.rtp[k - 1] = prev;
      if (k >= 2) {  // R_{k-1} continues the chain
        acc_t* dst = s.rbuf.data() + L.R_off[k - 1];
        transpose(prev, L.Qgt[k - 1], ra, dst);
        s.rp[k - 1] = dst;
      }
      continue;
    }
    acc_t* dst = s.rbuf.data() + L.R_off[k - 1];
    mm(r[k] * q[k], r[k + 1], L.Qgt[k], A[k], r[k + 1], int64_t{1}, s.rp[k], dst, false);
    s.rp[k - 1] = dst;
  }
  for (int64_t k = 0; k < d; ++k) {
    acc_t* o = outs[k];
    // m = L_k^T g: (r_k, q_k Q_{>k}); for k == 0, L_0 = [1] and m = g.
    const acc_t* m = g;
    if (k > 0) {
      const bool last = k == d - 1;
      acc_t* dst = last ? o : s.mbuf.data();
      mm(r[k], L.Qlt[k], q[k] * L.Qgt[k], s.lp[k], int64_t{1}, r[k], g, dst, last && k == acc_core);
      m = dst;
    }
    if (k == d - 1) continue;  // R_{d-1} = [1]: the slice gradient is m (already in o)
    // o = m (r_k q_k, Q_{>k}) @ R_k^T (Q_{>k}, r_{k+1})
    const int64_t rows = r[k + 1], cols = L.Qgt[k];
    const acc_t* rt = s.rtp[k];
    if (rt == nullptr) {
      transpose(s.rp[k], rows, cols, s.rt.data());
      rt = s.rt.data();
    }
    mm(r[k] * q[k], cols, rows, m, cols, int64_t{1}, rt, o, k == acc_core);
  }
}

// ------------------------------------------------------------ input prep

std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

template <typename scalar_t>
std::vector<const scalar_t*> const_ptrs(const std::vector<at::Tensor>& ts) {
  std::vector<const scalar_t*> out;
  for (const auto& t : ts) out.push_back(t.const_data_ptr<scalar_t>());
  return out;
}

// int32/int64 -> contiguous int64 (no copy when already int64 and contiguous).
at::Tensor as_int64(const at::Tensor& t) {
  return t.to(at::kLong).contiguous();
}

std::optional<at::Tensor> weights_as(const std::optional<at::Tensor>& w, at::ScalarType acc) {
  if (!w.has_value() || !w->defined()) return std::nullopt;
  return w->to(acc).contiguous();
}

// Grain so that a task gets >= ~target ids when bags are short.
int64_t bag_grain(int64_t num_bags, int64_t nnz, int64_t target = 16) {
  const int64_t avg = std::max<int64_t>(1, nnz / std::max<int64_t>(1, num_bags));
  return std::max<int64_t>(1, target / avg);
}

// --------------------------------------------------------------- forward

// in[0 .. n) reordered stably by key(x) in [0, bins) into out (counting sort).
template <typename Key>
void counting_sort(const int64_t* in, int64_t n, int64_t bins, const Key& key, int64_t* out) {
  std::vector<int64_t> start(bins + 1, 0);
  for (int64_t i = 0; i < n; ++i) ++start[key(in[i]) + 1];
  for (int64_t b = 0; b < bins; ++b) start[b + 1] += start[b];
  for (int64_t i = 0; i < n; ++i) out[start[key(in[i])]++] = in[i];
}

// The permutation that orders 0 .. n-1 stably by key(i) in [0, bins).
template <typename Key>
std::vector<int64_t> stable_order(int64_t n, int64_t bins, const Key& key) {
  std::vector<int64_t> identity(n), out(n);
  std::iota(identity.begin(), identity.end(), int64_t{0});
  counting_sort(identity.data(), n, bins, key, out.data());
  return out;
}

// (id, position) of every position, in (id, position) order: a stable LSD radix sort of
// the positions by id, 8 bits a pass over the bits the largest id needs (3 passes for
// 11M rows; std::sort of the pairs took ~5.5 ms of a one-thread backward at 82k ids).
std::vector<std::pair<int64_t, int64_t>> sorted_id_positions(const int64_t* ids, int64_t nnz) {
  int64_t max_id = 0;
  for (int64_t i = 0; i < nnz; ++i) max_id = std::max(max_id, ids[i]);
  std::vector<int64_t> pos(nnz), tmp(nnz);
  std::iota(pos.begin(), pos.end(), int64_t{0});
  for (int shift = 0; shift < 64 && (max_id >> shift) != 0; shift += 8) {
    counting_sort(pos.data(), nnz, 256, [&](int64_t i) { return (ids[i] >> shift) & 0xff; }, tmp.data());
    pos.swap(tmp);
  }
  std::vector<std::pair<int64_t, int64_t>> order(nnz);
  for (int64_t i = 0; i < nnz; ++i) order[i] = {ids[pos[i]], pos[i]};
  return order;
}

// The rows a bag pools are scattered over the span's row buffer (tens of MB): each is
// fetched from memory kPoolPrefetch positions ahead of its use (SpanRows::row_ahead).
constexpr int64_t kPoolPrefetch = 4;
template <typename T>
void prefetch_row(const T* row, int64_t n) {
  for (int64_t x = 0; x < n; x += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(row + x);
}

// Positions per span of the forward and of tt_lookup_rows: rows of ~64 MiB (the forward
// takes whole bags; a longer bag is taken a span of its positions at a time).
int64_t span_positions(const TTLayout& L, int64_t acc_size) {
  return std::max<int64_t>(1024, (int64_t{64} << 20) / std::max<int64_t>(1, L.D * acc_size));
}

// The rows of a span of positions, each unique id's computed once: the span's positions are
// sorted by id, the unique ids ordered by (big-core digit, id) and computed in that order by
// parallel tasks, so that ids sharing the largest slice run back to back while it is in
// cache, and an id with the previous one's prefix (i_0 .. i_{d-2}) reuses its prefix
// product. Each row is the same products in the same order as tt_row, so the same bits
// whatever the order and the task split. row(i) is the row of the span's position i.
// Buffers are kept from one span to the next.
template <typename scalar_t>
struct SpanRows {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> rows;      // [unique ids][D]
  std::vector<int64_t> row_of;  // span position -> unique id index
  std::vector<int64_t> by_id, by_big;  // unique ids in id order; their indices by (big digit, id)
  int64_t D = 0;

  void compute(const TTLayout& L, MmFn<acc_t> mm, const scalar_t* const* cores, const int64_t* ids, int64_t np) {
    D = L.D;
    const std::vector<std::pair<int64_t, int64_t>> order = sorted_id_positions(ids, np);
    row_of.resize(np);
    by_id.clear();
    for (int64_t e = 0; e < np; ++e) {
      if (e == 0 || order[e].first != order[e - 1].first) by_id.push_back(order[e].first);
      row_of[order[e].second] = static_cast<int64_t>(by_id.size()) - 1;
    }
    const int64_t nu = static_cast<int64_t>(by_id.size());
    by_big = stable_order(nu, L.p[L.kb], [&](int64_t u) { return L.big_digit(by_id[u]); });
    rows.resize(nu * D);
    at::parallel_for(0, nu, 256, [&](int64_t t0, int64_t t1) {
      RowScratch<scalar_t, acc_t> s(L);
      std::vector<int64_t> prefix(std::max<int64_t>(L.d - 1, 1), -1);
      const acc_t* P = nullptr;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t u = by_big[t], id = by_id[u];
        acc_t* row = rows.data() + u * D;
        if (L.d == 1) {
          s.load(L, cores, id);
          std::memcpy(row, s.A[0], sizeof(acc_t) * D);
          continue;
        }
        row_digits(id, L.p.data(), L.d, s.digit.data());
        if (P == nullptr || !std::equal(prefix.begin(), prefix.end(), s.digit.begin())) {
          for (int64_t k = 0; k < L.d - 1; ++k) {
            s.A[k] = load_slice(cores[k], s.digit[k], L.S[k], s.conv.data() + L.S_off[k]);
            prefix[k] = s.digit[k];
          }
          P = tt_prefix(L, mm, s.A.data(), s.buf0.data(), s.buf1.data());
        }
        const int64_t kl = L.d - 1;
        tt_row_of_prefix(L, mm, P, load_slice(cores[kl], s.digit[kl], L.S[kl], s.conv.data() + L.S_off[kl]), row);
      }
    });
  }

  const acc_t* row(int64_t i) const {
    return rows.data() + row_of[i] * D;
  }

  // row(i) of a loop over positions < n, with the row kPoolPrefetch positions ahead requested
  // from memory (the rows a loop reads are scattered over the buffer).
  const acc_t* row_ahead(int64_t i, int64_t n) const {
    if (i + kPoolPrefetch < n) prefetch_row(row(i + kPoolPrefetch), D);
    return row(i);
  }
};

// The forward, a span of bags at a time (memory: the rows of one span): each unique id's
// row once (SpanRows), then every bag pools its rows in position order. Results depend
// neither on the spans nor on the thread count (and are those of the row-by-row computation).
template <typename scalar_t>
void forward_kernel(
    const TTLayout& L,
    const std::vector<at::Tensor>& cores,
    const int64_t* ids,
    const int64_t* offsets,
    int64_t num_bags,
    int64_t nnz,
    const at::opmath_type<scalar_t>* weights,
    bool mean,
    scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto core_ptrs = const_ptrs<scalar_t>(cores);
  const MmFn<acc_t> mm = pick_mm<acc_t>();
  const int64_t D = L.D;
  const int64_t span = span_positions(L, sizeof(acc_t));
  SpanRows<scalar_t> sr;
  auto compute_rows = [&](int64_t p0, int64_t np) { sr.compute(L, mm, core_ptrs.data(), ids + p0, np); };
  // acc += the rows of bag b's positions [i0, i1), all within the computed [p0, p1).
  auto pool = [&](acc_t* TT_RESTRICT acc, int64_t b, int64_t i0, int64_t i1, int64_t p0, int64_t p1) {
    const int64_t start = offsets[b], end = offsets[b + 1];
    const acc_t inv_len = (mean && end > start) ? acc_t(1) / static_cast<acc_t>(end - start) : acc_t(1);
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t* TT_RESTRICT row = sr.row_ahead(i - p0, p1 - p0);
      if (weights == nullptr && !mean) {
        for (int64_t j = 0; j < D; ++j) acc[j] += row[j];
      } else {
        acc_t scale = weights ? weights[i] : acc_t(1);
        if (mean) scale = weights ? scale * inv_len : inv_len;
        for (int64_t j = 0; j < D; ++j) acc[j] += scale * row[j];
      }
    }
  };
  auto store = [&](const acc_t* acc, int64_t b) {
    for (int64_t j = 0; j < D; ++j) out[b * D + j] = static_cast<scalar_t>(acc[j]);
  };
  for (int64_t b0 = 0; b0 < num_bags;) {
    const int64_t* last = std::upper_bound(offsets + b0 + 1, offsets + num_bags + 1, offsets[b0] + span);
    const int64_t b1 = std::max<int64_t>(b0 + 1, (last - offsets) - 1);
    const int64_t p0 = offsets[b0], p1 = offsets[b1];
    if (p1 - p0 > span) {  // one bag longer than a span: its positions a span at a time, in order
      std::vector<acc_t> acc(D, acc_t(0));
      for (int64_t q0 = p0; q0 < p1; q0 += span) {
        const int64_t q1 = std::min(p1, q0 + span);
        compute_rows(q0, q1 - q0);
        pool(acc.data(), b0, q0, q1, q0, q1);
      }
      store(acc.data(), b0);
    } else {
      compute_rows(p0, p1 - p0);
      at::parallel_for(b0, b1, bag_grain(b1 - b0, p1 - p0), [&](int64_t c0, int64_t c1) {
        std::vector<acc_t> acc(D);
        for (int64_t b = c0; b < c1; ++b) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          pool(acc.data(), b, offsets[b], offsets[b + 1], p0, p1);
          store(acc.data(), b);
        }
      });
    }
    b0 = b1;
  }
}

at::Tensor tt_embedding_bag_forward_cpu(
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    c10::IntArrayRef p_shapes,
    c10::IntArrayRef q_shapes,
    c10::IntArrayRef ranks,
    int64_t num_embeddings,
    int64_t pooling_mode) {
  check_tt_args(kForwardOp, cores, p_shapes, q_shapes, ranks, num_embeddings);
  check_bag_args(kForwardOp, indices, offsets, per_sample_weights, num_embeddings, pooling_mode);
  const TTLayout L(p_shapes, q_shapes, ranks);
  const int64_t num_bags = offsets.numel() - 1;
  at::Tensor out = at::empty({num_bags, L.D}, cores[0].options());
  if (num_bags == 0 || L.D == 0) return out;
  const auto cores_c = contiguous_all(cores);
  const at::Tensor ids = as_int64(indices);
  const at::Tensor offs = as_int64(offsets);
  const bool mean = pooling_mode == static_cast<int64_t>(PoolingMode::MEAN);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "tt_embedding_bag_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto w = weights_as(per_sample_weights, c10::CppTypeToScalarType<acc_t>::value);
    forward_kernel<scalar_t>(
        L, cores_c, ids.const_data_ptr<int64_t>(), offs.const_data_ptr<int64_t>(), num_bags, ids.numel(),
        w ? w->const_data_ptr<acc_t>() : nullptr, mean, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

// ----------------------------------------------------------- lookup rows

at::Tensor tt_lookup_rows_cpu(
    at::TensorList cores,
    const at::Tensor& indices,
    c10::IntArrayRef p_shapes,
    c10::IntArrayRef q_shapes,
    c10::IntArrayRef ranks,
    int64_t num_embeddings) {
  check_tt_args(kLookupOp, cores, p_shapes, q_shapes, ranks, num_embeddings);
  check_lookup_indices(kLookupOp, indices);
  check_ids_values(kLookupOp, indices, num_embeddings);
  const TTLayout L(p_shapes, q_shapes, ranks);
  const int64_t n = indices.numel();
  at::Tensor out = at::empty({n, L.D}, cores[0].options());
  if (n == 0 || L.D == 0) return out;
  const auto cores_c = contiguous_all(cores);
  const at::Tensor ids_t = as_int64(indices);
  const int64_t* ids = ids_t.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "tt_lookup_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto core_ptrs = const_ptrs<scalar_t>(cores_c);
    const MmFn<acc_t> mm = pick_mm<acc_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t D = L.D;
    const int64_t span = span_positions(L, sizeof(acc_t));
    SpanRows<scalar_t> sr;
    for (int64_t p0 = 0; p0 < n; p0 += span) {
      const int64_t p1 = std::min(n, p0 + span);
      sr.compute(L, mm, core_ptrs.data(), ids + p0, p1 - p0);
      at::parallel_for(p0, p1, 256, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const acc_t* TT_RESTRICT row = sr.row_ahead(i - p0, p1 - p0);
          for (int64_t c = 0; c < D; ++c) o[i * D + c] = static_cast<scalar_t>(row[c]);
        }
      });
    }
  });
  return out;
}

// --------------------------------------------------------------- backward

// The prefix table of L (d >= 2): cores 0 .. d-2 with the last one's right rank
// folded into its output mode, q' = (q_0, .., q_{d-3}, q_{d-2} r_{d-1}), ranks
// (r_0, .., r_{d-2}, 1). Same slices in memory; its row is the prefix product
// P = A_0[i_0] .. A_{d-2}[i_{d-2}] as a (Q_{<d-1}, r_{d-1}) row-major matrix.
TTLayout prefix_layout(const TTLayout& L) {
  const int64_t dp = L.d - 1;
  std::vector<int64_t> p(L.p.begin(), L.p.begin() + dp), q(L.q.begin(), L.q.begin() + dp);
  std::vector<int64_t> r(L.r.begin(), L.r.begin() + dp + 1);
  q[dp - 1] *= L.r[dp];
  r[dp] = 1;
  return TTLayout(p, q, r);
}

// Scratch of item_grads (one per task).
template <typename acc_t>
struct ItemScratch {
  GradScratch<acc_t> gs;           // of the prefix layout
  std::vector<acc_t> P, dP, at;    // prefix product, its gradient, A_{d-1}[u]^T
  std::vector<acc_t> buf0, buf1;   // prefix chain
  std::vector<acc_t> kb_t;         // the run's kb slice, transposed
  ItemScratch(const TTLayout& L, const TTLayout& Lp)
      : gs(Lp),
        P(Lp.D),
        dP(Lp.D),
        at(L.S[L.d - 1]),
        buf0(Lp.max_chain),
        buf1(Lp.max_chain),
        kb_t(L.S[L.kb]) {}
};

// Slice gradients of the n unique ids perm[0 .. n) of one run (equal digit of core
// L.kb <= d - 2, ids in increasing order, so the ids of one prefix i_0 .. i_{d-2}
// come together). Per id u (g = g_u, from sum_g(u)), with G_u = g as a
// (Q_{<d-1}, q_{d-1}) matrix: the last core's slice gradient P^T G_u goes to the id's
// chunk row, and dP += G_u A_{d-1}[u]^T. Per item, the prefix cores' slice gradients
// of dP (tt_slice_grads on the prefix layout Lp): core kb's added into kb_row, the
// others into the chunk row of the item's first id (zeros in its other ids' rows).
// chunk: the chunk rows of perm[0 ..), row_S floats each, core k at off[k]; last_t:
// every slice of the last core transposed (q_{d-1}, r_{d-1}) in acc_t, or null (then
// each id's slice is transposed here).
template <typename scalar_t, typename acc_t, typename SumG>
void item_grads(
    const TTLayout& L,
    const TTLayout& Lp,
    MmFn<acc_t> mm,
    const std::vector<const scalar_t*>& cores,
    const int64_t* udig,
    const int64_t* perm,
    int64_t n,
    const SumG& sum_g,
    const acc_t* g,
    RowScratch<scalar_t, acc_t>& rs,
    ItemScratch<acc_t>& is,
    acc_t* kb_row,
    acc_t* chunk,
    int64_t row_S,
    const int64_t* off,
    const acc_t* last_t) {
  const int64_t d = L.d, kl = d - 1, kb = L.kb;
  const int64_t Qp = L.Qlt[kl], rl = L.r[kl], ql = L.q[kl];
  std::vector<acc_t*> outs(kl);
  // The run's kb slice, transposed once for the prefix gradients: as R_{d'-2}^T when kb
  // is the prefix's last core, else for the middle-core products (tt_slice_grads).
  const acc_t* rt_last = nullptr;
  const acc_t* bt_kb = nullptr;
  if (kl >= 2) {
    const acc_t* A_kb = load_slice(cores[kb], udig[perm[0] * d + kb], L.S[kb], rs.conv.data() + L.S_off[kb]);
    if (kb == kl - 1) {
      transpose(A_kb, Lp.r[kb], Lp.q[kb], is.kb_t.data());
      rt_last = is.kb_t.data();
    } else if (kb >= 1) {
      transpose_slice(Lp, kb, A_kb, is.kb_t.data());
      bt_kb = is.kb_t.data();
    }
  }
  auto same_prefix = [&](int64_t a, int64_t b) {
    return std::equal(udig + a * d, udig + a * d + kl, udig + b * d);
  };
  for (int64_t i0 = 0; i0 < n;) {
    int64_t i1 = i0 + 1;
    while (i1 < n && same_prefix(perm[i1], perm[i0])) ++i1;
    const int64_t* dig = udig + perm[i0] * d;
    for (int64_t k = 0; k < kl; ++k) rs.A[k] = load_slice(cores[k], dig[k], L.S[k], rs.conv.data() + L.S_off[k]);
    tt_row(Lp, mm, rs.A.data(), is.buf0.data(), is.buf1.data(), is.P.data());
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t u = perm[i];
      acc_t* row = chunk + i * row_S;
      sum_g(u);
      // last core: P^T G_u (r_{d-1}, q_{d-1})
      mm(rl, Qp, ql, is.P.data(), int64_t{1}, rl, g, row + off[kl], false);
      // dP (+)= G_u A_{d-1}[u]^T
      const int64_t dl = udig[u * d + kl];
      const acc_t* at = last_t != nullptr ? last_t + dl * L.S[kl] : nullptr;
      if (at == nullptr) {
        transpose(load_slice(cores[kl], dl, L.S[kl], rs.conv.data() + L.S_off[kl]), rl, ql, is.at.data());
        at = is.at.data();
      }
      mm(Qp, ql, rl, g, ql, int64_t{1}, at, is.dP.data(), i > i0);
      if (i > i0) {
        for (int64_t k = 0; k < kl; ++k)
          if (k != kb) std::fill(row + off[k], row + off[k] + L.S[k], acc_t(0));
      }
    }
    for (int64_t k = 0; k < kl; ++k) outs[k] = k == kb ? kb_row : chunk + i0 * row_S + off[k];
    tt_slice_grads(Lp, mm, rs.A.data(), is.dP.data(), is.gs, outs.data(), kb, bt_kb, rt_last);
    i0 = i1;
  }
}

// Dense core gradients in acc_t: grads[k] is a zeroed [p_k, S_k] buffer that
// receives, for every unique id u, the slice gradient L_k^T g_u R_k^T at row
// digit_k(u), where g_u = sum of scale_i * grad_output[bag(i)] over the
// positions i holding u. If touched is given, touched[k][i_k] is set for every
// digit of every id.
//
// Determinism (nothing depends on the number of threads):
// * (id, position) pairs are sorted, so g_u sums in position order;
// * the unique ids are ordered by (digit of core kb, id), kb = the core with
//   the largest slices. In each chunk of that order, one task per run of equal
//   kb-digits computes the slice gradients of its ids in order and adds the kb
//   slice straight into the row it owns in grads[kb] (which stays in cache);
// * the other cores' slices go to a chunk buffer and are then added, every
//   output column block owned by one task that walks the chunk in order.
// Prefix reuse (d >= 2 and kb <= d - 2, e.g. the seed shapes): inside a run, ids
// of one prefix (i_0 .. i_{d-2}) come together (an "item", see item_grads); its
// prefix product P and the gradient dP = sum_u G_u A_{d-1}[u]^T are formed once,
// and the prefix cores' slice gradients come from dP once per item instead of
// once per id (~2.3x fewer FLOPs at the seed shapes).
template <typename scalar_t>
void core_grads_kernel(
    const TTLayout& L,
    const std::vector<at::Tensor>& cores,
    const int64_t* ids,
    int64_t nnz,
    const int64_t* offsets,
    int64_t num_bags,
    const at::opmath_type<scalar_t>* weights,
    bool mean,
    const at::opmath_type<scalar_t>* grad_out,
    const std::vector<at::opmath_type<scalar_t>*>& grads,
    std::vector<std::vector<uint8_t>>* touched) {
  using acc_t = at::opmath_type<scalar_t>;
  if (nnz == 0) return;
  const int64_t d = L.d, D = L.D;
  const auto core_ptrs = const_ptrs<scalar_t>(cores);
  const MmFn<acc_t> mm = pick_mm<acc_t>();

  // Bag and pooling factor of every position.
  std::vector<int64_t> bag_of(nnz);
  std::vector<acc_t> scale;
  if (weights != nullptr || mean) scale.resize(nnz);
  at::parallel_for(0, num_bags, bag_grain(num_bags, nnz, 1024), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = offsets[b], end = offsets[b + 1];
      const acc_t inv_len = (mean && end > start) ? acc_t(1) / static_cast<acc_t>(end - start) : acc_t(1);
      for (int64_t i = start; i < end; ++i) {
        bag_of[i] = b;
        if (!scale.empty()) {
          acc_t sc = weights ? weights[i] : acc_t(1);
          if (mean) sc = weights ? sc * inv_len : inv_len;
          scale[i] = sc;
        }
      }
    }
  });

  // Coalesce duplicates: sort (id, position), segment by id.
  const std::vector<std::pair<int64_t, int64_t>> order = sorted_id_positions(ids, nnz);
  std::vector<int64_t> seg;  // seg[u] = first pair of unique id u; seg[n] = nnz
  seg.reserve(nnz + 1);
  for (int64_t i = 0; i < nnz; ++i)
    if (i == 0 || order[i].first != order[i - 1].first) seg.push_back(i);
  const int64_t n = static_cast<int64_t>(seg.size());
  seg.push_back(nnz);

  std::vector<int64_t> udig(n * d);
  for (int64_t u = 0; u < n; ++u) row_digits(order[seg[u]].first, L.p.data(), d, udig.data() + u * d);
  if (touched != nullptr) {
    touched->assign(d, {});
    for (int64_t k = 0; k < d; ++k) (*touched)[k].assign(L.p[k], 0);
    for (int64_t u = 0; u < n; ++u)
      for (int64_t k = 0; k < d; ++k) (*touched)[k][udig[u * d + k]] = 1;
  }

  // Unique ids ordered by (digit of the big core, id): stable counting sort.
  const int64_t kb = L.kb;
  const int64_t S_kb = L.S[kb];
  const std::vector<int64_t> perm = stable_order(n, L.p[kb], [&](int64_t u) { return udig[u * d + kb]; });

  // Chunk buffer for the other cores' slices: ~4 MiB, a size fixed by the shape and the number
  // of unique ids (never by the thread count). At the seed shapes a chunk holds ~11 runs of the
  // big digit, enough to share between threads (1 MiB held ~3: 2 threads ran 1.55x one).
  std::vector<int64_t> other_off(d, 0);
  int64_t other_S = 0;
  for (int64_t k = 0; k < d; ++k) {
    if (k == kb) continue;
    other_off[k] = other_S;
    other_S += L.S[k];
  }
  const int64_t per_id = std::max<int64_t>(1, other_S * static_cast<int64_t>(sizeof(acc_t)));
  const int64_t chunk = std::min<int64_t>(n, std::max<int64_t>(256, (int64_t{1} << 22) / per_id));
  std::vector<acc_t> sg(chunk * other_S);
  // Work units of the second pass: (core, column block) of the other cores.
  constexpr int64_t kColBlock = 512;
  std::vector<std::pair<int64_t, int64_t>> units;
  for (int64_t k = 0; k < d; ++k)
    for (int64_t c = 0; k != kb && c < L.S[k]; c += kColBlock) units.emplace_back(k, c);

  const bool use_items = d >= 2 && kb <= d - 2;
  const TTLayout Lp = use_items ? prefix_layout(L) : L;
  // The last core's slices transposed once for all ids (item_grads), when it is small
  // and the batch has more unique ids than it has slices.
  std::vector<acc_t> last_t;
  const int64_t kl = d - 1;
  if (use_items && L.p[kl] * L.S[kl] <= (int64_t{1} << 22) && n >= L.p[kl]) {
    last_t.resize(L.p[kl] * L.S[kl]);
    at::parallel_for(0, L.p[kl], 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        transpose(core_ptrs[kl] + i * L.S[kl], L.r[kl], L.q[kl], last_t.data() + i * L.S[kl]);
    });
  }
  std::vector<int64_t> runs;
  for (int64_t c0 = 0; c0 < n; c0 += chunk) {
    const int64_t c1 = std::min(n, c0 + chunk);
    runs.clear();
    for (int64_t t = c0; t < c1; ++t)
      if (t == c0 || udig[perm[t] * d + kb] != udig[perm[t - 1] * d + kb]) runs.push_back(t);
    const int64_t num_runs = static_cast<int64_t>(runs.size());
    runs.push_back(c1);
    at::parallel_for(0, num_runs, 1, [&](int64_t q0, int64_t q1) {
      RowScratch<scalar_t, acc_t> rs(L);
      GradScratch<acc_t> gs(L);
      std::vector<acc_t*> outs(d);
      acc_t* g = gs.g.data();
      std::optional<ItemScratch<acc_t>> is;
      if (use_items) is.emplace(L, Lp);
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t digit = udig[perm[runs[q]] * d + kb];
        acc_t* dst = grads[kb] + digit * S_kb;
        auto sum_g = [&](int64_t u) {  // g = g_u, its positions' output gradients summed in order
          std::fill(gs.g.begin(), gs.g.end(), acc_t(0));
          for (int64_t e = seg[u]; e < seg[u + 1]; ++e) {
            const int64_t pos = order[e].second;
            const acc_t* go = grad_out + bag_of[pos] * D;
            if (scale.empty()) {
              for (int64_t j = 0; j < D; ++j) g[j] += go[j];
            } else {
              const acc_t sc = scale[pos];
              for (int64_t j = 0; j < D; ++j) g[j] += sc * go[j];
            }
          }
        };
        if (use_items) {
          item_grads(
              L, Lp, mm, core_ptrs, udig.data(), perm.data() + runs[q], runs[q + 1] - runs[q], sum_g, g, rs, *is,
              dst, sg.data() + (runs[q] - c0) * other_S, other_S, other_off.data(),
              last_t.empty() ? nullptr : last_t.data());
          continue;
        }
        // per id (the big core is the last one, or d == 1)
        for (int64_t t = runs[q]; t < runs[q + 1]; ++t) {
          const int64_t u = perm[t];
          sum_g(u);
          for (int64_t k = 0; k < d; ++k) {
            rs.A[k] = load_slice(core_ptrs[k], udig[u * d + k], L.S[k], rs.conv.data() + L.S_off[k]);
            outs[k] = k == kb ? dst : sg.data() + (t - c0) * other_S + other_off[k];
          }
          tt_slice_grads(L, mm, rs.A.data(), g, gs, outs.data(), kb, static_cast<const acc_t*>(nullptr));
        }
      }
    });
    at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t k = units[w].first, col0 = units[w].second;
        const int64_t ncol = std::min(kColBlock, L.S[k] - col0);
        for (int64_t t = c0; t < c1; ++t) {
          acc_t* TT_RESTRICT dst = grads[k] + udig[perm[t] * d + k] * L.S[k] + col0;
          const acc_t* TT_RESTRICT src = sg.data() + (t - c0) * other_S + other_off[k] + col0;
          for (int64_t j = 0; j < ncol; ++j) dst[j] += src[j];
        }
      }
    });
  }
}

// Everything the two backward ops share: prepared inputs + dense acc grads.
struct BackwardInputs {
  std::vector<at::Tensor> cores;  // contiguous
  at::Tensor ids, offsets, grad_output;
  std::optional<at::Tensor> weights;
  std::vector<at::Tensor> grads;  // zero-initialised, acc dtype, core shapes
};

BackwardInputs compute_core_grads(
    const TTLayout& L,
    const at::Tensor& grad_output,
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t pooling_mode,
    std::vector<std::vector<uint8_t>>* touched) {
  BackwardInputs in;
  const at::ScalarType acc = at::toOpMathType(cores[0].scalar_type());
  in.cores = contiguous_all(cores);
  in.ids = as_int64(indices);
  in.offsets = as_int64(offsets);
  in.grad_output = grad_output.to(acc).contiguous();
  in.weights = weights_as(per_sample_weights, acc);
  for (const auto& c : cores) in.grads.push_back(at::zeros(c.sizes(), c.options().dtype(acc)));
  const bool mean = pooling_mode == static_cast<int64_t>(PoolingMode::MEAN);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cores[0].scalar_type(), "tt_core_grads_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t*> gptr;
    for (auto& g : in.grads) gptr.push_back(g.mutable_data_ptr<acc_t>());
    core_grads_kernel<scalar_t>(
        L, in.cores, in.ids.const_data_ptr<int64_t>(), in.ids.numel(), in.offsets.const_data_ptr<int64_t>(),
        in.offsets.numel() - 1, in.weights ? in.weights->const_data_ptr<acc_t>() : nullptr, mean,
        in.grad_output.const_data_ptr<acc_t>(), gptr, touched);
  });
  return in;
}

std::vector<at::Tensor> tt_embedding_bag_backward_cpu(
    const at::Tensor& grad_output,
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    c10::IntArrayRef p_shapes,
    c10::IntArrayRef q_shapes,
    c10::IntArrayRef ranks,
    int64_t num_embeddings,
    int64_t pooling_mode) {
  check_tt_args(kBackwardOp, cores, p_shapes, q_shapes, ranks, num_embeddings);
  check_bag_args(kBackwardOp, indices, offsets, per_sample_weights, num_embeddings, pooling_mode);
  check_grad_output(kBackwardOp, grad_output, offsets, q_shapes);
  const TTLayout L(p_shapes, q_shapes, ranks);
  BackwardInputs in =
      compute_core_grads(L, grad_output, cores, indices, offsets, per_sample_weights, pooling_mode, nullptr);
  std::vector<at::Tensor> out;
  for (size_t k = 0; k < cores.size(); ++k) out.push_back(in.grads[k].to(cores[k].scalar_type()));
  return out;
}

// ------------------------------------------------------ fused optimizer

// Applies the optimizer to the touched rows of one core (contiguous w, dense
// acc grad g, state already in acc_t and contiguous, or empty for SGD).
template <typename scalar_t>
void update_core(
    scalar_t* w,
    const at::opmath_type<scalar_t>* g,
    at::opmath_type<scalar_t>* state,
    const std::vector<int64_t>& rows,
    int64_t S,
    int64_t optimizer,
    double learning_rate,
    double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t lr = static_cast<acc_t>(learning_rate);
  const acc_t ep = static_cast<acc_t>(eps);
  at::parallel_for(0, static_cast<int64_t>(rows.size()), std::max<int64_t>(1, 4096 / std::max<int64_t>(1, S)),
                   [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = rows[t];
      scalar_t* wi = w + i * S;
      const acc_t* gi = g + i * S;
      if (optimizer == static_cast<int64_t>(FusedOptimizer::SGD)) {
        for (int64_t j = 0; j < S; ++j) wi[j] = static_cast<scalar_t>(static_cast<acc_t>(wi[j]) - lr * gi[j]);
      } else if (optimizer == static_cast<int64_t>(FusedOptimizer::ADAGRAD)) {
        acc_t* si = state + i * S;
        for (int64_t j = 0; j < S; ++j) {
          const acc_t s = si[j] + gi[j] * gi[j];
          si[j] = s;
          wi[j] = static_cast<scalar_t>(static_cast<acc_t>(wi[j]) - lr * gi[j] / (std::sqrt(s) + ep));
        }
      } else {  // row-wise Adagrad
        acc_t sq = 0;
        for (int64_t j = 0; j < S; ++j) sq += gi[j] * gi[j];
        const acc_t s = state[i] + sq / static_cast<acc_t>(S);
        state[i] = s;
        const acc_t denom = std::sqrt(s) + ep;
        for (int64_t j = 0; j < S; ++j) wi[j] = static_cast<scalar_t>(static_cast<acc_t>(wi[j]) - lr * gi[j] / denom);
      }
    }
  });
}

void tt_embedding_bag_backward_fused_cpu(
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
  // Validate everything (including every id and offset) before any write.
  check_tt_args(kFusedOp, cores, p_shapes, q_shapes, ranks, num_embeddings);
  check_bag_args(kFusedOp, indices, offsets, per_sample_weights, num_embeddings, pooling_mode);
  check_grad_output(kFusedOp, grad_output, offsets, q_shapes);
  check_optimizer_state(kFusedOp, cores, optimizer_state, optimizer);
  if (indices.numel() == 0) return;
  const TTLayout L(p_shapes, q_shapes, ranks);
  std::vector<std::vector<uint8_t>> touched;
  // All gradients from the cores as they are on entry.
  BackwardInputs in =
      compute_core_grads(L, grad_output, cores, indices, offsets, per_sample_weights, pooling_mode, &touched);
  const at::ScalarType acc = at::toOpMathType(cores[0].scalar_type());
  for (int64_t k = 0; k < L.d; ++k) {
    std::vector<int64_t> rows;
    for (int64_t i = 0; i < L.p[k]; ++i)
      if (touched[k][i]) rows.push_back(i);
    if (rows.empty()) continue;
    const at::Tensor& core = cores[k];
    // in.cores[k] aliases core when core is contiguous; otherwise it is a copy
    // that is written back below.
    at::Tensor w = in.cores[k];
    at::Tensor state;
    bool state_direct = true;
    if (optimizer != static_cast<int64_t>(FusedOptimizer::SGD)) {
      const at::Tensor& st = optimizer_state[k];
      state_direct = st.scalar_type() == acc && st.is_contiguous();
      state = state_direct ? st : st.to(acc).contiguous();
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, core.scalar_type(), "tt_fused_update_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      update_core<scalar_t>(
          w.mutable_data_ptr<scalar_t>(), in.grads[k].const_data_ptr<acc_t>(),
          state.defined() ? state.mutable_data_ptr<acc_t>() : nullptr, rows, L.S[k], optimizer, learning_rate,
          eps);
    });
    // Raw writes bypass the version counter; bump it as the reference's
    // index_copy_ does (copy_ / index_copy_ below bump by themselves).
    if (w.is_same(core)) {
      core.unsafeGetTensorImpl()->bump_version();
    } else {
      core.copy_(w);
    }
    if (state_direct && state.defined()) {
      state.unsafeGetTensorImpl()->bump_version();
    } else if (!state_direct) {
      const at::Tensor idx = at::tensor(rows, at::TensorOptions().dtype(at::kLong));
      optimizer_state[k].index_copy_(0, idx, state.index_select(0, idx).to(optimizer_state[k].scalar_type()));
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(torchrec_tt, CPU, m) {
  m.impl("tt_embedding_bag_forward", &tt_embedding_bag_forward_cpu);
  m.impl("tt_embedding_bag_backward", &tt_embedding_bag_backward_cpu);
  m.impl("tt_embedding_bag_backward_fused_", &tt_embedding_bag_backward_fused_cpu);
  m.impl("tt_lookup_rows", &tt_lookup_rows_cpu);
}

}  // namespace torchrec_tt
