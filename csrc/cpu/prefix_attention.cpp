// CPU launchers of prefix_attention (shared-prefix causal attention), forward and backward.
//
// Both passes run at::parallel_for over tasks (m-chunk, k), all heads inside a task. Keys are processed in tiles of
// kKeyTile keys stored transposed (Dh x kKeyTile), and queries in blocks of kQueryBlock, so every
// inner product is a register-blocked micro-kernel (kQueryBlock x kKeyTile accumulators, no
// horizontal sums). Each query keeps an online softmax over the tiles (forward) or recomputes its
// probabilities from the saved lse (backward): no (S, P + S) score tensor exists, only one
// kQueryBlock x kKeyTile block of scores at a time. A backward task owns the suffix key/value
// gradients of its sequences outright and sums the prefix key/value gradients of expert k over its
// m-chunk in private accumulators; the chunk partials are reduced in a fixed order afterwards
// (deterministic, no data races). The CPU kernels compute in the input type (float32 / float64).
// On x86 the hot loops are compiled twice, for AVX2+FMA and for the baseline ISA, picked at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "prefix_attention.h"
#include "prefix_attention_args.h"
#include "outputs.h"

#include "cpu_isa.h"
#include "launchers.h"
#define GF_ALWAYS_INLINE __attribute__((always_inline)) inline
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors in always-inline helpers: no ABI is crossed
#endif

namespace guidg_fast {
namespace {

using namespace prefix_attention_args;

constexpr int kKeyTile = 16;

// kBytes-wide vectors through the GCC / clang vector extension: ymm registers in the AVX2 clone,
// pairs of xmm registers in the baseline one.
template <typename T, int kBytes>
struct Simd {
  typedef T vec __attribute__((vector_size(kBytes)));
  typedef T unaligned_vec __attribute__((vector_size(kBytes), aligned(alignof(T))));
  static constexpr int lanes = kBytes / static_cast<int>(sizeof(T));
  static constexpr int per_tile = kKeyTile / lanes;  // vectors per row of a transposed tile
  static GF_ALWAYS_INLINE vec load(const T* p) { return *reinterpret_cast<const unaligned_vec*>(p); }
  static GF_ALWAYS_INLINE void store(T* p, vec v) { *reinterpret_cast<unaligned_vec*>(p) = v; }
  // (a lane-by-lane fill, or x - vec{}, measured up to 1.6x slower in the micro-kernels with GCC 12)
  static GF_ALWAYS_INLINE vec splat(T x) { return vec{} + x; }
};

// Queries per block: enough independent accumulators (QB x kKeyTile / lanes = 8 vectors) to hide the
// FMA latency, few enough to stay in registers.
constexpr int query_block(int bytes) { return bytes >= 64 ? 8 : 4; }

template <typename T, int QB>
using Block = T[QB][kKeyTile];

// out[t] = exp(x[t]) over one row of a score block (x = -inf gives 0). float: a vectorised
// Cephes-style expf (range reduction by ln 2, degree-6 polynomial, exponent bits), within 2 ulp of
// expf over the range that matters; inputs below -87.3 give 0 (the true value is below FLT_MIN, under
// 1e-37 relative to the running sum of at least 1). double: std::exp.
template <typename T, int W>
GF_ALWAYS_INLINE void exp_row(const T* x, T* out) {
  if constexpr (!std::is_same<T, float>::value) {
    for (int t = 0; t < kKeyTile; ++t) out[t] = std::exp(x[t]);
  } else {
    using V = Simd<float, W>;
    typedef int32_t ivec __attribute__((vector_size(W)));
    const typename V::vec lo = V::splat(-87.3f), hi = V::splat(88.3f), one = V::splat(1.0f);
    for (int v = 0; v < V::per_tile; ++v) {
      const typename V::vec xin = V::load(x + v * V::lanes);
      typename V::vec xc = xin < lo ? lo : xin;
      xc = xc > hi ? hi : xc;
      const typename V::vec fx = xc * V::splat(1.44269504088896341f) + V::splat(0.5f);
      typename V::vec n = __builtin_convertvector(__builtin_convertvector(fx, ivec), typename V::vec);  // trunc
      n = n > fx ? n - one : n;                                                                           // floor
      const typename V::vec r = xc - n * V::splat(0.693359375f) - n * V::splat(-2.12194440e-4f);
      typename V::vec y = V::splat(1.9875691500e-4f);
      y = y * r + V::splat(1.3981999507e-3f);
      y = y * r + V::splat(8.3334519073e-3f);
      y = y * r + V::splat(4.1665795894e-2f);
      y = y * r + V::splat(1.6666665459e-1f);
      y = y * r + V::splat(5.0000001201e-1f);
      y = y * r * r + r + one;
      const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
      typename V::vec pow2n;
      std::memcpy(&pow2n, &bits, sizeof(pow2n));
      const typename V::vec result = xin < lo ? V::splat(0.0f) : y * pow2n;
      V::store(out + v * V::lanes, result);
    }
  }
}

template <typename T>
GF_ALWAYS_INLINE T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out[i][t] = <x_i, column t of the transposed tile> for the kQueryBlock rows x_i (row stride Dh).
// NV: vectors of the tile row that hold keys (fewer than per_tile for a short last tile, e.g. the
// 1 + S keys after a 16-key prefix tile); the other columns of out are set to 0.
template <typename T, int W, int NV = Simd<T, W>::per_tile>
GF_ALWAYS_INLINE void block_tile_dots(const T* x, const T* tile, int64_t Dh, Block<T, query_block(W)>& out) {
  using V = Simd<T, W>;
  constexpr int kQueryBlock = query_block(W);
  typename V::vec acc[kQueryBlock][NV] = {};
  for (int64_t d = 0; d < Dh; ++d) {
    typename V::vec col[NV];
    for (int v = 0; v < NV; ++v) col[v] = V::load(tile + d * kKeyTile + v * V::lanes);
    for (int i = 0; i < kQueryBlock; ++i) {
      const typename V::vec xd = V::splat(x[i * Dh + d]);
      for (int v = 0; v < NV; ++v) acc[i][v] += xd * col[v];
    }
  }
  for (int i = 0; i < kQueryBlock; ++i) {
    for (int v = 0; v < NV; ++v) V::store(&out[i][v * V::lanes], acc[i][v]);
    for (int v = NV; v < V::per_tile; ++v) V::store(&out[i][v * V::lanes], typename V::vec{});
  }
}

// acc_i[d] += sum_{t < n} w[i][t] * rows[t][d] for the kQueryBlock rows acc_i (row stride Dh):
// softmax(scores) @ V in the forward, dS @ K in the backward
template <typename T, int W>
GF_ALWAYS_INLINE void block_combine_rows(T* acc, const Block<T, query_block(W)>& w, const T* const* rows, int64_t n, int64_t Dh) {
  using V = Simd<T, W>;
  constexpr int kQueryBlock = query_block(W);
  int64_t d0 = 0;
  for (; d0 + V::lanes <= Dh; d0 += V::lanes) {
    typename V::vec a[kQueryBlock];
    for (int i = 0; i < kQueryBlock; ++i) a[i] = V::load(acc + i * Dh + d0);
    for (int64_t t = 0; t < n; ++t) {
      const typename V::vec r = V::load(rows[t] + d0);
      for (int i = 0; i < kQueryBlock; ++i) a[i] += V::splat(w[i][t]) * r;
    }
    for (int i = 0; i < kQueryBlock; ++i) V::store(acc + i * Dh + d0, a[i]);
  }
  for (; d0 < Dh; ++d0) {
    for (int64_t t = 0; t < n; ++t) {
      const T r = rows[t][d0];
      for (int i = 0; i < kQueryBlock; ++i) acc[i * Dh + d0] += w[i][t] * r;
    }
  }
}

// tile[d][t] += sum_i x_i[d] * w[i][t]: dK = dS^T Q and dV = P^T dO, accumulated transposed
// (the first NV vectors of each tile row, as in block_tile_dots)
template <typename T, int W, int NV = Simd<T, W>::per_tile>
GF_ALWAYS_INLINE void block_tile_outer_add(const T* x, const Block<T, query_block(W)>& w, int64_t Dh, T* tile) {
  using V = Simd<T, W>;
  constexpr int kQueryBlock = query_block(W);
  typename V::vec wv[kQueryBlock][NV];
  for (int i = 0; i < kQueryBlock; ++i)
    for (int v = 0; v < NV; ++v) wv[i][v] = V::load(&w[i][v * V::lanes]);
  for (int64_t d = 0; d < Dh; ++d) {
    typename V::vec col[NV];
    for (int v = 0; v < NV; ++v) col[v] = V::load(tile + d * kKeyTile + v * V::lanes);
    for (int i = 0; i < kQueryBlock; ++i) {
      const typename V::vec xd = V::splat(x[i * Dh + d]);
      for (int v = 0; v < NV; ++v) col[v] += xd * wv[i][v];
    }
    for (int v = 0; v < NV; ++v) V::store(tile + d * kKeyTile + v * V::lanes, col[v]);
  }
}

// rows[t][d] += sum_i alpha w[i][t] x_i[d] for t in [t_begin, t_end): the suffix keys' dK / dV
// accumulated in row layout, straight into the output rows (no transposed tile to write back)
template <typename T, int W>
GF_ALWAYS_INLINE void rows_outer_add(T* const* rows, const Block<T, query_block(W)>& w, T alpha, const T* x,
                                     int64_t t_begin, int64_t t_end, int64_t Dh) {
  using V = Simd<T, W>;
  constexpr int kQueryBlock = query_block(W);
  for (int64_t t = t_begin; t < t_end; ++t) {
    T* r = rows[t];
    T wt[kQueryBlock];
    for (int i = 0; i < kQueryBlock; ++i) wt[i] = alpha * w[i][t];
    int64_t d0 = 0;
    for (; d0 + V::lanes <= Dh; d0 += V::lanes) {
      typename V::vec a = V::load(r + d0);
      for (int i = 0; i < kQueryBlock; ++i) a += V::splat(wt[i]) * V::load(x + i * Dh + d0);
      V::store(r + d0, a);
    }
    for (; d0 < Dh; ++d0) {
      T a = r[d0];
      for (int i = 0; i < kQueryBlock; ++i) a += wt[i] * x[i * Dh + d0];
      r[d0] = a;
    }
  }
}

// A tile whose keys all fit in the first vector of a tile row (the short dynamic tile after a
// 16-key prefix tile: 1 + S keys for the 17-token [SOS, 16 x ctx] prefix) runs its micro-kernels on
// that vector only.
template <typename T, int W>
GF_ALWAYS_INLINE bool narrow_tile(int64_t tile_size) {
  return Simd<T, W>::per_tile > 1 && tile_size <= Simd<T, W>::lanes;
}

template <typename scalar_t>
struct Inputs {
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  const scalar_t* kp;
  const scalar_t* vp;
  SuffixStrides sq, sk, sv;
  PrefixStrides skp, svp;
  PrefixAttentionShape shape;
  double scale;
};

template <typename scalar_t>
GF_ALWAYS_INLINE const scalar_t* key_ptr(const Inputs<scalar_t>& in, int64_t k, int64_t m, int64_t h, int64_t j) {
  const int64_t P = in.shape.P;
  return j < P ? in.kp + prefix_offset(in.skp, k, j, h) : in.k + suffix_offset(in.sk, k, m, j - P, h);
}
template <typename scalar_t>
GF_ALWAYS_INLINE const scalar_t* value_ptr(const Inputs<scalar_t>& in, int64_t k, int64_t m, int64_t h, int64_t j) {
  const int64_t P = in.shape.P;
  return j < P ? in.vp + prefix_offset(in.svp, k, j, h) : in.v + suffix_offset(in.sv, k, m, j - P, h);
}

// Tiles cut the key sequence [prefix 0..P-1, suffix 0..S-1] (global key index j) every kKeyTile
// keys. Tiles entirely inside the prefix are the same for every sequence of an expert; the others
// ("dynamic") start with the prefix remainder and continue with the sequence's own suffix keys, so
// P = 17, S = 8 needs 2 tiles, not 3.
struct Tiling {
  int64_t P, S, n_keys, tiles, static_tiles;
  explicit Tiling(const PrefixAttentionShape& sh)
      : P(sh.P), S(sh.S), n_keys(sh.P + sh.S), tiles((sh.P + sh.S + kKeyTile - 1) / kKeyTile),
        static_tiles(sh.P / kKeyTile) {}
  int64_t first_key(int64_t tile) const { return tile * kKeyTile; }
  int64_t size(int64_t tile) const { return std::min<int64_t>(kKeyTile, n_keys - tile * kKeyTile); }
  // leading columns of the tile that are prefix keys
  int64_t prefix_columns(int64_t tile) const {
    return std::max<int64_t>(0, std::min<int64_t>(size(tile), P - tile * kKeyTile));
  }
  // how many keys of the tile query s sees (query s sees keys j <= P + s); s < 0: an unused block row
  int64_t visible(int64_t tile, int64_t s) const {
    if (s < 0) return 0;
    return std::max<int64_t>(0, std::min<int64_t>(size(tile), P + s + 1 - tile * kKeyTile));
  }
};

// dst[d * kKeyTile + t] = row(t)[d] for t in [t_begin, t_end). d outer: the stores run along the
// tile's rows and each source row is read as a stream (t outer, storing down a tile column with
// a 64-byte stride, was a quarter of the backward's time).
template <typename T, typename RowFn>
GF_ALWAYS_INLINE void transpose_rows(RowFn row, int64_t t_begin, int64_t t_end, int64_t Dh, T* dst) {
  const T* rows[kKeyTile];
  for (int64_t t = t_begin; t < t_end; ++t) rows[t] = row(t);
  for (int64_t d = 0; d < Dh; ++d) {
    for (int64_t t = t_begin; t < t_end; ++t) dst[d * kKeyTile + t] = rows[t][d];
  }
}

// zero columns [t_begin, kKeyTile) of a transposed tile
template <typename T>
GF_ALWAYS_INLINE void zero_columns(int64_t t_begin, int64_t Dh, T* dst) {
  for (int64_t d = 0; d < Dh; ++d)
    for (int64_t t = t_begin; t < kKeyTile; ++t) dst[d * kKeyTile + t] = T(0);
}

// rows s0 .. s0 + kQueryBlock - 1 of one sequence into a dense block; rows past S are zero
template <int kQueryBlock, typename T, typename RowFn>
GF_ALWAYS_INLINE void load_block(RowFn row, int64_t s0, int64_t S, int64_t Dh, T* dst) {
  for (int i = 0; i < kQueryBlock; ++i) {
    if (s0 + i < S) std::copy(row(s0 + i), row(s0 + i) + Dh, dst + i * Dh);
    else std::fill(dst + i * Dh, dst + (i + 1) * Dh, T(0));
  }
}

// Tasks are (m-chunk, k): the prefix tiles of expert k are transposed once per task and reused by
// every sequence of the chunk; the heads of a sequence run one after another (contiguous memory).
struct TaskSplit {
  int64_t m_chunk, n_chunks;
  TaskSplit(const PrefixAttentionShape& sh, int64_t want_tasks) {
    const int64_t kh = std::max<int64_t>(1, sh.K);
    const int64_t chunks = std::min<int64_t>(std::max<int64_t>(sh.M, 1), std::max<int64_t>(1, (want_tasks + kh - 1) / kh));
    m_chunk = std::max<int64_t>(1, (sh.M + chunks - 1) / chunks);
    n_chunks = (sh.M + m_chunk - 1) / m_chunk;
  }
};

// ------------------------------------------------------------------------------------------ forward

template <typename T, int W>
GF_ALWAYS_INLINE void forward_tasks(const Inputs<T>& in, T* out, T* lse, int64_t m_chunk, int64_t begin, int64_t end) {
  constexpr int kQueryBlock = query_block(W);
  const PrefixAttentionShape sh = in.shape;
  const int64_t Dh = sh.Dh, S = sh.S;
  const T scale = static_cast<T>(in.scale);
  const Tiling tiling(sh);
  const int64_t tile_elems = Dh * kKeyTile;
  const int64_t head_elems = tiling.tiles * tile_elems;
  // the transposed key tiles of every head of expert k, then a query block and its accumulators
  std::vector<T> buffer(sh.H * head_elems + 2 * kQueryBlock * Dh);
  T* q = buffer.data() + sh.H * head_elems;
  T* acc = q + kQueryBlock * Dh;
  Block<T, kQueryBlock> sc, w;
  const T* rows[kKeyTile];
  OnlineSoftmax<T> softmax[kQueryBlock];
  for (int64_t task = begin; task < end; ++task) {
    const int64_t k = task % sh.K;
    const int64_t chunk = task / sh.K;
    const int64_t m_begin = chunk * m_chunk, m_end = std::min(sh.M, m_begin + m_chunk);
    for (int64_t h = 0; h < sh.H; ++h) {
      for (int64_t tile = 0; tile < tiling.tiles; ++tile) {
        T* dst = buffer.data() + h * head_elems + tile * tile_elems;
        const int64_t j0 = tiling.first_key(tile);
        transpose_rows<T>([&](int64_t t) { return key_ptr(in, k, 0, h, j0 + t); }, 0, tiling.prefix_columns(tile), Dh,
                          dst);
        zero_columns<T>(tiling.size(tile), Dh, dst);
      }
    }
    // heads innermost: the (S, H, Dh) block of one sequence is read as one contiguous stretch
    for (int64_t m = m_begin; m < m_end; ++m) {
      for (int64_t h = 0; h < sh.H; ++h) {
      T* key_tiles = buffer.data() + h * head_elems;
      for (int64_t tile = tiling.static_tiles; tile < tiling.tiles; ++tile) {
        const int64_t j0 = tiling.first_key(tile);
        transpose_rows<T>([&](int64_t t) { return key_ptr(in, k, m, h, j0 + t); }, tiling.prefix_columns(tile),
                          tiling.size(tile), Dh, key_tiles + tile * tile_elems);
      }
      for (int64_t s0 = 0; s0 < S; s0 += kQueryBlock) {
        load_block<kQueryBlock, T>([&](int64_t s) { return in.q + suffix_offset(in.sq, k, m, s, h); }, s0, S, Dh, q);
        std::fill(acc, acc + kQueryBlock * Dh, T(0));
        for (int i = 0; i < kQueryBlock; ++i) softmax[i].init();
        for (int64_t tile = 0; tile < tiling.tiles; ++tile) {
          // visibility grows with s: the block's last used row sees the most keys
          const int64_t n_max = tiling.visible(tile, std::min(S - 1, s0 + kQueryBlock - 1));
          if (n_max == 0) continue;
          const int64_t j0 = tiling.first_key(tile);
          if (narrow_tile<T, W>(tiling.size(tile))) block_tile_dots<T, W, 1>(q, key_tiles + tile * tile_elems, Dh, sc);
          else block_tile_dots<T, W>(q, key_tiles + tile * tile_elems, Dh, sc);
          for (int i = 0; i < kQueryBlock; ++i) {
            const int64_t n = tiling.visible(tile, s0 + i < S ? s0 + i : -1);
            if (n == 0) {
              std::fill(w[i], w[i] + kKeyTile, T(0));
              continue;
            }
            T* row = sc[i];
            T tile_max = -INFINITY;
            for (int t = 0; t < kKeyTile; ++t) {
              row[t] = t < n ? scale * row[t] : -INFINITY;
              tile_max = std::max(tile_max, row[t]);
            }
            const T alpha = softmax[i].absorb_max(tile_max);
            if (alpha != T(1)) {
              T* a = acc + i * Dh;
#pragma omp simd
              for (int64_t d = 0; d < Dh; ++d) a[d] *= alpha;
            }
            for (int t = 0; t < kKeyTile; ++t) row[t] -= softmax[i].max;
            exp_row<T, W>(row, w[i]);
            T sum = 0;
            for (int t = 0; t < kKeyTile; ++t) sum += w[i][t];
            softmax[i].sum += sum;
          }
          for (int64_t t = 0; t < n_max; ++t) rows[t] = value_ptr(in, k, m, h, j0 + t);
          block_combine_rows<T, W>(acc, w, rows, n_max, Dh);
        }
        for (int i = 0; i < kQueryBlock && s0 + i < S; ++i) {
          const T inv = softmax[i].inv_sum();
          T* o = out + dense_row(sh, k, m, s0 + i, h) * Dh;
          const T* a = acc + i * Dh;
#pragma omp simd
          for (int64_t d = 0; d < Dh; ++d) o[d] = a[d] * inv;
          lse[lse_index(sh, k, m, h, s0 + i)] = softmax[i].lse();
        }
      }
      }
    }
  }
}

template <typename T>
GF_ISA_TARGET_AVX2 void forward_tasks_avx2(const Inputs<T>& in, T* out, T* lse, int64_t m_chunk, int64_t b, int64_t e) {
  forward_tasks<T, 32>(in, out, lse, m_chunk, b, e);
}
template <typename T>
void forward_tasks_baseline(const Inputs<T>& in, T* out, T* lse, int64_t m_chunk, int64_t b, int64_t e) {
  forward_tasks<T, 32>(in, out, lse, m_chunk, b, e);
}

// The AVX2 clone also serves AVX-512 CPUs: a 64-byte-vector clone with 8-query blocks measured
// slower than AVX2 on a Xeon with AVX-512, so there is none (cpu_isa.h: the one ISA switch).
inline bool use_avx2(Isa isa) { return isa != Isa::kBaseline; }

// ----------------------------------------------------------------------------------------- backward

template <typename T>
struct Grads {
  const T* grad_out;  // dense (K, M, S, H, Dh)
  const T* out;       // dense
  const T* lse;       // dense (K, M, H, S)
  T* dq;              // (K, M, S, H, Dh) with strides sdq (dense, or slices of a packed QKV gradient)
  T* dk;
  T* dv;
  SuffixStrides sdq, sdk, sdv;
  T* dkp_partial;  // (chunks, K, P, H, Dh): prefix gradients summed over one m-chunk
  T* dvp_partial;
  int64_t m_chunk;
};

template <typename T, int W>
GF_ALWAYS_INLINE void backward_tasks(const Inputs<T>& in, const Grads<T>& g, int64_t begin, int64_t end) {
  constexpr int kQueryBlock = query_block(W);
  const PrefixAttentionShape sh = in.shape;
  const int64_t Dh = sh.Dh, P = sh.P, S = sh.S;
  const T scale = static_cast<T>(in.scale);
  const Tiling tiling(sh);
  const int64_t tile_elems = Dh * kKeyTile;
  const int64_t all_tiles = tiling.tiles * tile_elems;
  // per head: transposed K and V tiles and the transposed dK / dV accumulators of the same tiles
  // (prefix columns summed over the task's m-chunk, suffix columns over one sequence); then q, dO,
  // dq of one query block
  std::vector<T> buffer(4 * sh.H * all_tiles + 3 * kQueryBlock * Dh);
  T* q = buffer.data() + 4 * sh.H * all_tiles;
  T* dout = q + kQueryBlock * Dh;
  T* dq = dout + kQueryBlock * Dh;
  Block<T, kQueryBlock> sc, dp, p, ds;
  const T* rows[kKeyTile];
  T delta[kQueryBlock], lse[kQueryBlock];
  for (int64_t task = begin; task < end; ++task) {
    const int64_t k = task % sh.K;
    const int64_t chunk = task / sh.K;
    const int64_t m_begin = chunk * g.m_chunk, m_end = std::min(sh.M, m_begin + g.m_chunk);
    for (int64_t h = 0; h < sh.H; ++h) {
      T* key_tiles = buffer.data() + 4 * h * all_tiles;
      T* value_tiles = key_tiles + all_tiles;
      for (int64_t tile = 0; tile < tiling.tiles; ++tile) {
        const int64_t j0 = tiling.first_key(tile), n = tiling.prefix_columns(tile);
        transpose_rows<T>([&](int64_t t) { return key_ptr(in, k, 0, h, j0 + t); }, 0, n, Dh,
                          key_tiles + tile * tile_elems);
        transpose_rows<T>([&](int64_t t) { return value_ptr(in, k, 0, h, j0 + t); }, 0, n, Dh,
                          value_tiles + tile * tile_elems);
        zero_columns<T>(tiling.size(tile), Dh, key_tiles + tile * tile_elems);
        zero_columns<T>(tiling.size(tile), Dh, value_tiles + tile * tile_elems);
      }
      std::fill(value_tiles + all_tiles, value_tiles + 3 * all_tiles, T(0));  // dK, dV accumulators
    }
    // heads innermost: the (S, H, Dh) block of one sequence is read as one contiguous stretch
    for (int64_t m = m_begin; m < m_end; ++m) {
      for (int64_t h = 0; h < sh.H; ++h) {
        T* key_tiles = buffer.data() + 4 * h * all_tiles;
        T* value_tiles = key_tiles + all_tiles;
        T* dkey_tiles = value_tiles + all_tiles;
        T* dvalue_tiles = dkey_tiles + all_tiles;
        for (int64_t tile = tiling.static_tiles; tile < tiling.tiles; ++tile) {
          const int64_t j0 = tiling.first_key(tile);
          const int64_t t0 = tiling.prefix_columns(tile), t1 = tiling.size(tile);
          transpose_rows<T>([&](int64_t t) { return key_ptr(in, k, m, h, j0 + t); }, t0, t1, Dh,
                            key_tiles + tile * tile_elems);
          transpose_rows<T>([&](int64_t t) { return value_ptr(in, k, m, h, j0 + t); }, t0, t1, Dh,
                            value_tiles + tile * tile_elems);
        }
        // this sequence's suffix dK / dV rows: accumulated in place over its query blocks
        T* dk_rows[kKeyTile];  // rows of the current tile's suffix keys, by tile column
        T* dv_rows[kKeyTile];
        for (int64_t s = 0; s < S; ++s) {
          T* dk_row = g.dk + suffix_offset(g.sdk, k, m, s, h);
          T* dv_row = g.dv + suffix_offset(g.sdv, k, m, s, h);
          std::fill(dk_row, dk_row + Dh, T(0));
          std::fill(dv_row, dv_row + Dh, T(0));
        }
        for (int64_t s0 = 0; s0 < S; s0 += kQueryBlock) {
          load_block<kQueryBlock, T>([&](int64_t s) { return in.q + suffix_offset(in.sq, k, m, s, h); }, s0, S, Dh, q);
          load_block<kQueryBlock, T>([&](int64_t s) { return g.grad_out + dense_row(sh, k, m, s, h) * Dh; }, s0, S, Dh, dout);
          for (int i = 0; i < kQueryBlock; ++i) {
            const bool used = s0 + i < S;
            delta[i] = used ? dot(dout + i * Dh, g.out + dense_row(sh, k, m, s0 + i, h) * Dh, Dh) : T(0);
            lse[i] = used ? g.lse[lse_index(sh, k, m, h, s0 + i)] : T(0);
          }
          std::fill(dq, dq + kQueryBlock * Dh, T(0));
          for (int64_t tile = 0; tile < tiling.tiles; ++tile) {
            const int64_t n_max = tiling.visible(tile, std::min(S - 1, s0 + kQueryBlock - 1));
            if (n_max == 0) continue;
            const int64_t j0 = tiling.first_key(tile);
            const bool narrow = narrow_tile<T, W>(tiling.size(tile));
            if (narrow) {
              block_tile_dots<T, W, 1>(q, key_tiles + tile * tile_elems, Dh, sc);
              block_tile_dots<T, W, 1>(dout, value_tiles + tile * tile_elems, Dh, dp);
            } else {
              block_tile_dots<T, W>(q, key_tiles + tile * tile_elems, Dh, sc);
              block_tile_dots<T, W>(dout, value_tiles + tile * tile_elems, Dh, dp);
            }
            for (int i = 0; i < kQueryBlock; ++i) {
              const int64_t n = tiling.visible(tile, s0 + i < S ? s0 + i : -1);
              // p = exp(scale * qk - lse) (recompute_probability), vectorised over the tile
              for (int t = 0; t < kKeyTile; ++t) sc[i][t] = t < n ? scale * sc[i][t] - lse[i] : -INFINITY;
              exp_row<T, W>(sc[i], p[i]);
              for (int t = 0; t < kKeyTile; ++t) ds[i][t] = score_gradient<T>(p[i][t], dp[i][t], delta[i]);
            }
            for (int64_t t = 0; t < n_max; ++t) rows[t] = key_ptr(in, k, m, h, j0 + t);
            block_combine_rows<T, W>(dq, ds, rows, n_max, Dh);
            const int64_t pc = tiling.prefix_columns(tile);
            if (pc < n_max) {
              // suffix keys of this sequence: dK = scale dS^T Q and dV = P^T dO into their rows,
              // then out of the tile's scores so the transposed accumulators see prefix keys only
              for (int64_t t = pc; t < n_max; ++t) {
                dk_rows[t] = g.dk + suffix_offset(g.sdk, k, m, j0 + t - P, h);
                dv_rows[t] = g.dv + suffix_offset(g.sdv, k, m, j0 + t - P, h);
              }
              rows_outer_add<T, W>(dk_rows, ds, scale, q, pc, n_max, Dh);
              rows_outer_add<T, W>(dv_rows, p, T(1), dout, pc, n_max, Dh);
              for (int i = 0; i < kQueryBlock; ++i) {
                for (int t = static_cast<int>(pc); t < kKeyTile; ++t) ds[i][t] = p[i][t] = T(0);
              }
            }
            if (pc > 0) {  // prefix keys: summed over the task's sequences in the transposed tiles
              if (narrow) {
                block_tile_outer_add<T, W, 1>(q, ds, Dh, dkey_tiles + tile * tile_elems);
                block_tile_outer_add<T, W, 1>(dout, p, Dh, dvalue_tiles + tile * tile_elems);
              } else {
                block_tile_outer_add<T, W>(q, ds, Dh, dkey_tiles + tile * tile_elems);
                block_tile_outer_add<T, W>(dout, p, Dh, dvalue_tiles + tile * tile_elems);
              }
            }
          }
          for (int i = 0; i < kQueryBlock && s0 + i < S; ++i) {
            T* dst = g.dq + suffix_offset(g.sdq, k, m, s0 + i, h);
            const T* src = dq + i * Dh;
#pragma omp simd
            for (int64_t d = 0; d < Dh; ++d) dst[d] = scale * src[d];
          }
        }
      }
    }
    for (int64_t h = 0; h < sh.H; ++h) {
      const T* dkey_tiles = buffer.data() + 4 * h * all_tiles + 2 * all_tiles;
      const T* dvalue_tiles = dkey_tiles + all_tiles;
      for (int64_t tile = 0; tile < tiling.tiles; ++tile) {
        const int64_t j0 = tiling.first_key(tile);
        const T* dkt = dkey_tiles + tile * tile_elems;
        const T* dvt = dvalue_tiles + tile * tile_elems;
        for (int64_t t = 0; t < tiling.prefix_columns(tile); ++t) {
          const int64_t dst = (((chunk * sh.K + k) * P + j0 + t) * sh.H + h) * Dh;
          for (int64_t d = 0; d < Dh; ++d) {
            g.dkp_partial[dst + d] = scale * dkt[d * kKeyTile + t];
            g.dvp_partial[dst + d] = dvt[d * kKeyTile + t];
          }
        }
      }
    }
  }
}

template <typename T>
GF_ISA_TARGET_AVX2 void backward_tasks_avx2(const Inputs<T>& in, const Grads<T>& g, int64_t b, int64_t e) {
  backward_tasks<T, 32>(in, g, b, e);
}
template <typename T>
void backward_tasks_baseline(const Inputs<T>& in, const Grads<T>& g, int64_t b, int64_t e) {
  backward_tasks<T, 32>(in, g, b, e);
}

// ----------------------------------------------------------------------------------------- launchers

template <typename scalar_t>
Inputs<scalar_t> make_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kp,
                             const at::Tensor& vp, const PrefixAttentionShape& shape, double scale) {
  return {q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), kp.data_ptr<scalar_t>(),
          vp.data_ptr<scalar_t>(), suffix_strides(q), suffix_strides(k), suffix_strides(v), prefix_strides(kp), prefix_strides(vp), shape, scale};
}

void check_cpu_dtype(const char* op, const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), op, " (CPU kernel): q must be a CPU tensor");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
              " (CPU kernel): q must be float32 or float64, got ", q.scalar_type());
}

// The forward of one (K, M, S, H, Dh) problem into dense out (K, M, S, H, Dh) / lse (K, M, H, S).
template <typename scalar_t>
void run_forward(const Inputs<scalar_t>& in, scalar_t* out, scalar_t* lse) {
  const PrefixAttentionShape& sh = in.shape;
  if (sh.K * sh.M * sh.H == 0 || sh.S == 0 || sh.Dh == 0) return;
  // few, long tasks (8 per thread): the prefix tiles are transposed once per task
  const TaskSplit split(sh, 8 * static_cast<int64_t>(at::get_num_threads()));
  const Isa isa = cpu_isa();
  at::parallel_for(0, split.n_chunks * sh.K, 1, [&](int64_t b, int64_t e) {
    if (use_avx2(isa)) forward_tasks_avx2<scalar_t>(in, out, lse, split.m_chunk, b, e);
    else forward_tasks_baseline<scalar_t>(in, out, lse, split.m_chunk, b, e);
  });
}

// The backward of one problem: dq / dk / dv through g (any strides), the prefix gradients summed
// over the M sequences into dkp / dvp (dense (K, P, H, Dh), overwritten).
template <typename scalar_t>
void run_backward(const Inputs<scalar_t>& in, Grads<scalar_t> g, scalar_t* dkp, scalar_t* dvp) {
  using acc_t = scalar_t;
  const PrefixAttentionShape& sh = in.shape;
  const int64_t n = sh.K * sh.P * sh.H * sh.Dh;
  if (sh.K * sh.M * sh.H * sh.S * sh.Dh == 0) {
    std::fill(dkp, dkp + n, scalar_t(0));
    std::fill(dvp, dvp + n, scalar_t(0));
    return;
  }
  // Enough (m-chunk, k) tasks to keep every thread busy; each chunk keeps its own prefix partial.
  const TaskSplit split(sh, 8 * static_cast<int64_t>(at::get_num_threads()));
  const int64_t n_chunks = split.n_chunks;
  // every (chunk, k) slot is written by its task: no initialisation needed
  std::unique_ptr<acc_t[]> partial(n_chunks == 1 ? nullptr : new acc_t[2 * n_chunks * n]);
  g.dkp_partial = n_chunks == 1 ? dkp : partial.get();
  g.dvp_partial = n_chunks == 1 ? dvp : partial.get() + n_chunks * n;
  g.m_chunk = split.m_chunk;
  const Isa isa = cpu_isa();
  at::parallel_for(0, n_chunks * sh.K, 1, [&](int64_t b, int64_t e) {
    if (use_avx2(isa)) backward_tasks_avx2<scalar_t>(in, g, b, e);
    else backward_tasks_baseline<scalar_t>(in, g, b, e);
  });
  if (n_chunks > 1) {
    // fixed-order sum over the chunks: the result does not depend on the thread count's timing
    const acc_t* src = partial.get();
    // a few adds per element: one thread unless the partials are large (waking threads costs more)
    at::parallel_for(0, n, std::max<int64_t>(4096, (int64_t(1) << 20) / n_chunks), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        acc_t sk = 0, sv = 0;
        for (int64_t c = 0; c < n_chunks; ++c) {
          sk += src[c * n + i];
          sv += src[(n_chunks + c) * n + i];
        }
        dkp[i] = sk;
        dvp[i] = sv;
      }
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prefix_attention_forward_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                const at::Tensor& v_in, const at::Tensor& kp_in,
                                                                const at::Tensor& vp_in, double scale) {
  const PrefixAttentionShape sh = check_inputs("prefix_attention_forward", q_in, k_in, v_in, kp_in, vp_in);
  check_cpu_dtype("prefix_attention_forward", q_in);
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor kp = unit_last_stride(kp_in), vp = unit_last_stride(vp_in);
  at::Tensor out = new_output({sh.K, sh.M, sh.S, sh.H, sh.Dh}, q.options());
  at::Tensor lse = new_output({sh.K, sh.M, sh.H, sh.S}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "prefix_attention_forward_cpu", [&] {
    run_forward<scalar_t>(make_inputs<scalar_t>(q, k, v, kp, vp, sh, scale), out.data_ptr<scalar_t>(),
                          lse.data_ptr<scalar_t>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& kp_in, const at::Tensor& vp_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    double scale) {
  const PrefixAttentionShape sh = check_inputs("prefix_attention_backward", q_in, k_in, v_in, kp_in, vp_in);
  check_cpu_dtype("prefix_attention_backward", q_in);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "prefix_attention_backward: grad_out and out must have q's shape ", q_in.sizes(), ", got ",
              grad_out_in.sizes(), " and ", out_in.sizes());
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({sh.K, sh.M, sh.H, sh.S}),
              "prefix_attention_backward: lse must have shape (K, M, H, S) = (", sh.K, ", ", sh.M, ", ", sh.H, ", ",
              sh.S, "), got ", lse_in.sizes());
  for (const at::Tensor* t : {&grad_out_in, &out_in, &lse_in}) {
    TORCH_CHECK(t->scalar_type() == q_in.scalar_type() && t->device() == q_in.device(),
                "prefix_attention_backward: grad_out, out and lse must match q's dtype and device");
  }
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor kp = unit_last_stride(kp_in), vp = unit_last_stride(vp_in);
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor dq = new_output(q.sizes(), q.options()), dk = new_output(q.sizes(), q.options());
  at::Tensor dv = new_output(q.sizes(), q.options());
  at::Tensor dkp = new_output({sh.K, sh.P, sh.H, sh.Dh}, q.options());
  at::Tensor dvp = new_output({sh.K, sh.P, sh.H, sh.Dh}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "prefix_attention_backward_cpu", [&] {
    Grads<scalar_t> g{grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                      dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
                      suffix_strides(dq), suffix_strides(dk), suffix_strides(dv), nullptr, nullptr, 0};
    run_backward<scalar_t>(make_inputs<scalar_t>(q, k, v, kp, vp, sh, scale), g, dkp.data_ptr<scalar_t>(),
                           dvp.data_ptr<scalar_t>());
  });
  return {dq, dk, dv, dkp, dvp};
}

namespace {

// ------------------------------------------------------------------------------------------ packed
// Every suffix group of a text pass in one call. qkv (T, 3, H, Dh) is the fused QKV projection of
// all T packed suffix tokens; groups = [t0, M, S] per group: tokens t0 .. t0 + K*M*S - 1 are the
// group's (K, M, S) sequences, in order, covering [0, T). out (T, H, Dh) holds every group's dense
// output in place, lse (T * H) every group's dense (K, M, H, S) block at t0 * H; the backward
// writes dq / dk / dv straight into one (T, 3, H, Dh) gradient: no per-group outputs to
// concatenate or stack.
// Measured (shared 2-core box, 2026-12-03): one CPU step-1 iteration (bench/entries/step1_iteration.py,
// fast provider, ViT-B-16 random init, K = 3, C = 200, B = 32), 3 runs of each layout alternated:
// packed median 8.90 s (8.73 .. 9.77), per-group prefix_attention median 15.05 s (11.79 .. 16.40): the
// packed layout saves ~41% of the iteration. Command: with s1 = guidg_fast.bench.entries.step1_iteration,
// run = s1.make(s1.cases(False)[0], "fast", torch.device("cpu")); time run() alternately as is and
// with guidg_fast.ops.prefix_attention's _packed_cpu_kernels patched to return False (per group).

struct Group {
  int64_t t0, M, S;
};

std::vector<Group> check_packed(const char* op, const at::Tensor& qkv, const at::Tensor& kp, const at::Tensor& vp,
                                at::IntArrayRef groups) {
  GF_CHECK_DIM(qkv, 4, "qkv (T, 3, H, Dh)");
  GF_CHECK_DIM(kp, 4, "k_prefix (K, P, H, Dh)");
  TORCH_CHECK(qkv.size(1) == 3, op, ": qkv must have shape (T, 3, H, Dh), got ", qkv.sizes());
  const int64_t T = qkv.size(0), H = qkv.size(2), Dh = qkv.size(3), K = kp.size(0);
  TORCH_CHECK(kp.size(2) == H && kp.size(3) == Dh && kp.size(1) >= 1, op, ": k_prefix must have shape (K, P, ", H,
              ", ", Dh, ") with P >= 1, got ", kp.sizes());
  TORCH_CHECK(vp.sizes() == kp.sizes(), op, ": v_prefix must have k_prefix's shape ", kp.sizes(), ", got ",
              vp.sizes());
  for (const at::Tensor* t : {&kp, &vp}) {
    TORCH_CHECK(t->scalar_type() == qkv.scalar_type() && t->device() == qkv.device(), op,
                ": k_prefix and v_prefix must have qkv's dtype and device");
  }
  TORCH_CHECK(groups.size() % 3 == 0 && !groups.empty(), op, ": groups must hold [first token, M, S] per group, got ",
              groups.size(), " values");
  std::vector<Group> out;
  int64_t next = 0;
  for (size_t i = 0; i < groups.size(); i += 3) {
    const Group gr{groups[i], groups[i + 1], groups[i + 2]};
    TORCH_CHECK(gr.t0 == next && gr.M >= 1 && gr.S >= 1, op, ": group ", i / 3, " = [", gr.t0, ", ", gr.M, ", ", gr.S,
                "] must start at token ", next, " (groups in order, back to back) with M >= 1 and S >= 1");
    next += K * gr.M * gr.S;
    out.push_back(gr);
  }
  TORCH_CHECK(next == T, op, ": the groups cover ", next, " tokens (K * M * S each, K = ", K, ") but qkv has T = ", T);
  return out;
}

// The (K, M, S, H, Dh) view of one of q / k / v (which = 0, 1, 2) of a group inside a (T, 3, H, Dh) tensor.
at::Tensor group_view(const at::Tensor& packed, const Group& gr, int64_t K, int64_t which) {
  return packed.narrow(0, gr.t0, K * gr.M * gr.S).select(1, which).view({K, gr.M, gr.S, packed.size(2), packed.size(3)});
}

// The groups' (m-chunk, k) tasks, numbered across groups so that one parallel region runs them all
// (small groups would leave threads idle in a region of their own).
template <typename scalar_t>
struct PackedPlan {
  std::vector<Inputs<scalar_t>> inputs;
  std::vector<TaskSplit> splits;
  std::vector<int64_t> first_chunk;  // per group: its first m-chunk counted over all groups, then the total
  int64_t K = 0;                      // experts: a group's tasks are its (m-chunk, k) pairs

  int64_t first_task(size_t gi) const { return first_chunk[gi] * K; }
  int64_t tasks() const { return first_chunk.back() * K; }
  // group of a global task (groups are few: a linear scan)
  size_t group_of(int64_t task) const {
    size_t gi = 0;
    while (task >= first_task(gi + 1)) ++gi;
    return gi;
  }
};

template <typename scalar_t>
PackedPlan<scalar_t> packed_plan(const at::Tensor& qkv, const at::Tensor& kp, const at::Tensor& vp,
                                 const std::vector<Group>& gs, double scale) {
  const int64_t H = qkv.size(2), Dh = qkv.size(3), K = kp.size(0), P = kp.size(1);
  PackedPlan<scalar_t> plan;
  plan.K = K;
  plan.first_chunk.push_back(0);
  for (const Group& gr : gs) {
    const PrefixAttentionShape sh{K, gr.M, gr.S, H, Dh, P};
    const at::Tensor q = group_view(qkv, gr, K, 0), k = group_view(qkv, gr, K, 1), v = group_view(qkv, gr, K, 2);
    plan.inputs.push_back(make_inputs<scalar_t>(q, k, v, kp, vp, sh, scale));
    // tasks in proportion to the group's share of the tokens: on average 8 per thread per group
    const int64_t want = std::max<int64_t>(1, (8 * at::get_num_threads() * gr.M * gr.S * gs.size()) /
                                                  std::max<int64_t>(1, qkv.size(0) / K));
    plan.splits.emplace_back(sh, want);
    plan.first_chunk.push_back(plan.first_chunk.back() + plan.splits.back().n_chunks);
  }
  return plan;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prefix_attention_packed_forward_cpu(const at::Tensor& qkv_in,
                                                                       const at::Tensor& kp_in,
                                                                       const at::Tensor& vp_in,
                                                                       at::IntArrayRef groups, double scale) {
  const char* op = "prefix_attention_packed_forward";
  const std::vector<Group> gs = check_packed(op, qkv_in, kp_in, vp_in, groups);
  check_cpu_dtype(op, qkv_in);
  const at::Tensor qkv = qkv_in.contiguous(), kp = unit_last_stride(kp_in), vp = unit_last_stride(vp_in);
  const int64_t T = qkv.size(0), H = qkv.size(2), Dh = qkv.size(3);
  at::Tensor out = new_output({T, H, Dh}, qkv.options());
  at::Tensor lse = new_output({T * H}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "prefix_attention_packed_forward", [&] {
    const PackedPlan<scalar_t> plan = packed_plan<scalar_t>(qkv, kp, vp, gs, scale);
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    scalar_t* lse_ptr = lse.data_ptr<scalar_t>();
    const Isa isa = cpu_isa();
    at::parallel_for(0, plan.tasks(), 1, [&](int64_t b, int64_t e) {
      for (int64_t task = b; task < e; ++task) {
        const size_t gi = plan.group_of(task);
        const int64_t local = task - plan.first_task(gi), t0 = gs[gi].t0, m_chunk = plan.splits[gi].m_chunk;
        scalar_t* o = out_ptr + t0 * H * Dh;
        scalar_t* l = lse_ptr + t0 * H;
        if (use_avx2(isa)) forward_tasks_avx2<scalar_t>(plan.inputs[gi], o, l, m_chunk, local, local + 1);
        else forward_tasks_baseline<scalar_t>(plan.inputs[gi], o, l, m_chunk, local, local + 1);
      }
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prefix_attention_packed_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& qkv_in, const at::Tensor& kp_in, const at::Tensor& vp_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, at::IntArrayRef groups, double scale) {
  const char* op = "prefix_attention_packed_backward";
  const std::vector<Group> gs = check_packed(op, qkv_in, kp_in, vp_in, groups);
  check_cpu_dtype(op, qkv_in);
  const int64_t T = qkv_in.size(0), H = qkv_in.size(2), Dh = qkv_in.size(3), K = kp_in.size(0), P = kp_in.size(1);
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef({T, H, Dh}) && out_in.sizes() == grad_out_in.sizes(), op,
              ": grad_out and out must have shape (T, H, Dh) = (", T, ", ", H, ", ", Dh, "), got ", grad_out_in.sizes(),
              " and ", out_in.sizes());
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({T * H}), op, ": lse must have shape (T * H,) = (", T * H, ",), got ",
              lse_in.sizes());
  for (const at::Tensor* t : {&grad_out_in, &out_in, &lse_in}) {
    TORCH_CHECK(t->scalar_type() == qkv_in.scalar_type() && t->device() == qkv_in.device(), op,
                ": grad_out, out and lse must match qkv's dtype and device");
  }
  const at::Tensor qkv = qkv_in.contiguous(), kp = unit_last_stride(kp_in), vp = unit_last_stride(vp_in);
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor dqkv = new_output({T, 3, H, Dh}, qkv.options());
  at::Tensor dkp = new_output({K, P, H, Dh}, qkv.options()), dvp = new_output({K, P, H, Dh}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "prefix_attention_packed_backward", [&] {
    const PackedPlan<scalar_t> plan = packed_plan<scalar_t>(qkv, kp, vp, gs, scale);
    // one (K, P, H, Dh) prefix-gradient partial per (group, m-chunk), laid out (chunk, k) as
    // backward_tasks writes it; every slot is written by its task
    const int64_t n = K * P * H * Dh, slots = plan.first_chunk.back();
    std::unique_ptr<scalar_t[]> partial(new scalar_t[2 * slots * n]);
    std::vector<Grads<scalar_t>> grads;
    for (size_t gi = 0; gi < gs.size(); ++gi) {
      const Group& gr = gs[gi];
      const at::Tensor dq = group_view(dqkv, gr, K, 0), dk = group_view(dqkv, gr, K, 1), dv = group_view(dqkv, gr, K, 2);
      const int64_t slot = plan.first_chunk[gi];
      grads.push_back({grad_out.data_ptr<scalar_t>() + gr.t0 * H * Dh, out.data_ptr<scalar_t>() + gr.t0 * H * Dh,
                       lse.data_ptr<scalar_t>() + gr.t0 * H, dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                       dv.data_ptr<scalar_t>(), suffix_strides(dq), suffix_strides(dk), suffix_strides(dv),
                       partial.get() + slot * n, partial.get() + (slots + slot) * n, plan.splits[gi].m_chunk});
    }
    const Isa isa = cpu_isa();
    at::parallel_for(0, plan.tasks(), 1, [&](int64_t b, int64_t e) {
      for (int64_t task = b; task < e; ++task) {
        const size_t gi = plan.group_of(task);
        const int64_t local = task - plan.first_task(gi);
        if (use_avx2(isa)) backward_tasks_avx2<scalar_t>(plan.inputs[gi], grads[gi], local, local + 1);
        else backward_tasks_baseline<scalar_t>(plan.inputs[gi], grads[gi], local, local + 1);
      }
    });
    // fixed-order sum over the (group, chunk) partials: deterministic whatever the scheduling
    const scalar_t* src = partial.get();
    scalar_t* dst_k = dkp.data_ptr<scalar_t>();
    scalar_t* dst_v = dvp.data_ptr<scalar_t>();
    const int64_t per_k = P * H * Dh;
    at::parallel_for(0, n, std::max<int64_t>(4096, (int64_t(1) << 20) / std::max<int64_t>(1, slots)),
                     [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t k = i / per_k, r = i % per_k;
        scalar_t sk = 0, sv = 0;
        for (size_t gi = 0; gi < gs.size(); ++gi) {
          const int64_t first = plan.first_chunk[gi], chunks = plan.splits[gi].n_chunks;
          for (int64_t c = 0; c < chunks; ++c) {
            const int64_t off = (first + c) * n + k * per_k + r;
            sk += src[off];
            sv += src[slots * n + off];
          }
        }
        dst_k[i] = sk;
        dst_v[i] = sv;
      }
    });
  });
  return {dqkv, dkp, dvp};
}

}  // namespace guidg_fast
