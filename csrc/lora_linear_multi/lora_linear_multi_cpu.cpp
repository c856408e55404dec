#include "lora_linear_multi_cpu.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// The per-item work is compiled twice, for AVX + FMA and for the baseline ISA, and picked at load time
// ("fma" implies AVX, so the 32-byte vectors below are single registers there); the helpers are forced
// inline into it so that they are compiled with the clone's ISA too.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTPEFT_CLONES __attribute__((target_clones("fma", "default")))
#else
#define FASTPEFT_CLONES
#endif
#define FASTPEFT_INLINE __attribute__((always_inline)) inline
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors by value: only inside always-inline helpers
#endif

namespace fastpeft {
namespace {

template <typename T> using work_t = typename acc<T>::type;

template <typename T>
inline T store_w(work_t<T> v) {
  if constexpr (std::is_same_v<T, double>) return v;
  else return from_float<T>(v);
}

template <typename T>
inline work_t<T> load_w(T v) { return static_cast<work_t<T>>(to_float(v)); }

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Output columns per register tile of the expand: 64 bytes of accumulators per row.
template <typename W> constexpr int64_t kCols = 64 / sizeof(W);

// u[i * rank + j] = Σ_k xr[i][k] · a[j * lda + k], for i < rows, j < rank.  Four rows share each load of
// A; the k loops are vectorised reductions.  (Blocks of four rows by two ranks were measured slower.)
template <typename W>
FASTPEFT_INLINE void shrink_rows(const W* const* xr, int64_t rows, int64_t K, const W* a, int64_t lda, int64_t rank,
                                 W* u) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    const W *x0 = xr[i], *x1 = xr[i + 1], *x2 = xr[i + 2], *x3 = xr[i + 3];
    for (int64_t j = 0; j < rank; ++j) {
      const W* aj = a + j * lda;
      W s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t k = 0; k < K; ++k) {
        const W av = aj[k];
        s0 += x0[k] * av;
        s1 += x1[k] * av;
        s2 += x2[k] * av;
        s3 += x3[k] * av;
      }
      u[i * rank + j] = s0;
      u[(i + 1) * rank + j] = s1;
      u[(i + 2) * rank + j] = s2;
      u[(i + 3) * rank + j] = s3;
    }
  }
  for (; i < rows; ++i) {
    const W* x0 = xr[i];
    for (int64_t j = 0; j < rank; ++j) {
      const W* aj = a + j * lda;
      W s0 = 0;
#pragma omp simd reduction(+ : s0)
      for (int64_t k = 0; k < K; ++k) s0 += x0[k] * aj[k];
      u[i * rank + j] = s0;
    }
  }
}

// Two 32-byte vectors (GCC/Clang vector extension: AVX registers in the haswell clone, pairs of SSE
// registers in the default one) hold the kCols columns of one row of the expand's register tile.
typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
template <typename W> struct vec;
template <> struct vec<float> { using type = f32x8; };
template <> struct vec<double> { using type = f64x4; };
template <typename W> using vec_t = typename vec<W>::type;
template <typename W> constexpr int kLanes = 32 / sizeof(W);
static_assert(2 * kLanes<float> == kCols<float> && 2 * kLanes<double> == kCols<double>, "tile = two vectors");

template <typename W>
FASTPEFT_INLINE vec_t<W> loadu(const W* p) {
  vec_t<W> v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// RR rows of  y_i[n] = init[n] + Σ_j u[i * rank + j] · bt[j * ldb + n]  (n < N), kCols columns at a time
// held in registers; bt and init are zero-padded to a multiple of kCols columns.
template <typename T, int RR>
FASTPEFT_INLINE void expand_tile(const work_t<T>* u, int64_t rank, const work_t<T>* bt,
                                                       int64_t ldb, const work_t<T>* init, int64_t N, T* const* yr) {
  using W = work_t<T>;
  using V = vec_t<W>;
  constexpr int L = kLanes<W>;
  for (int64_t n0 = 0; n0 < N; n0 += 2 * L) {
    V acc[RR][2];
    const V i0 = loadu(init + n0), i1 = loadu(init + n0 + L);
    for (int i = 0; i < RR; ++i) {
      acc[i][0] = i0;
      acc[i][1] = i1;
    }
    for (int64_t j = 0; j < rank; ++j) {
      const V b0 = loadu(bt + j * ldb + n0), b1 = loadu(bt + j * ldb + n0 + L);
      for (int i = 0; i < RR; ++i) {
        const W c = u[i * rank + j];
        acc[i][0] += c * b0;
        acc[i][1] += c * b1;
      }
    }
    const int64_t cols = std::min<int64_t>(2 * L, N - n0);
    for (int i = 0; i < RR; ++i) {
      if constexpr (std::is_same_v<T, W>) {
        if (cols == 2 * L) {  // a full tile: two vector stores
          __builtin_memcpy(yr[i] + n0, &acc[i][0], sizeof acc[i][0]);
          __builtin_memcpy(yr[i] + n0 + L, &acc[i][1], sizeof acc[i][1]);
          continue;
        }
      }
      W out[2 * L];
      __builtin_memcpy(out, acc[i], sizeof out);
      for (int64_t l = 0; l < cols; ++l) yr[i][n0 + l] = store_w<T>(out[l]);
    }
  }
}

template <typename T>
FASTPEFT_INLINE void expand_rows(const work_t<T>* u, int64_t rows, int64_t rank, const work_t<T>* bt, int64_t ldb,
                                 const work_t<T>* init, int64_t N, T* const* yr) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) expand_tile<T, 4>(u + i * rank, rank, bt, ldb, init, N, yr + i);
  for (; i < rows; ++i) expand_tile<T, 1>(u + i * rank, rank, bt, ldb, init, N, yr + i);
}

// One unit of work: rows order[begin .. end) of bucket `bucket` (0 = base only, else adapter bucket - 1).
struct Item {
  int64_t bucket, begin, end;
};

// Rows per work item: enough items for every thread to take about four, 8 to 64 rows each.
int64_t rows_per_item(int64_t M) {
  const int64_t want = (M + 4 * max_threads() - 1) / (4 * max_threads());
  return std::max<int64_t>(8, std::min<int64_t>(64, (want + 3) / 4 * 4));
}

// What every item of one call shares.
template <typename T>
struct Plan {
  const LoraMultiProblem<T>& p;
  const int64_t* order;
  const work_t<T>* init;  // bias (or 0) in the work type, zero-padded to ldb
  int64_t ldb;            // row stride of the packed B_aᵀ
  bool x_in_place, a_in_place;  // x rows / A rows are already contiguous rows of the work type
};

// A thread's buffers, and which adapter they hold packed.
template <typename T>
struct Workspace {
  using W = work_t<T>;
  std::vector<W> apack, bt, xbuf, u;
  std::vector<const W*> xr;
  std::vector<T*> yr;
  int64_t packed = -1;
  const W* a_rows = nullptr;
  int64_t lda = 0;
  Workspace(const Plan<T>& pl, int64_t RB)
      : apack(pl.a_in_place ? 0 : pl.p.r_max * pl.p.K), bt(pl.p.r_max * pl.ldb), xbuf(pl.x_in_place ? 0 : RB * pl.p.K),
        u(RB * pl.p.r_max), xr(RB), yr(RB) {}
};

template <typename T>
FASTPEFT_CLONES void run_item(const Plan<T>& pl, const Item& w, Workspace<T>& ws) {
  using W = work_t<T>;
  const LoraMultiProblem<T>& p = pl.p;
  const int64_t K = p.K, N = p.N, ldb = pl.ldb;
  const int64_t a = w.bucket - 1, rows = w.end - w.begin;
  const int64_t rank = a < 0 ? 0 : (p.ranks ? p.ranks[a] : p.r_max);
  for (int64_t i = 0; i < rows; ++i) ws.yr[i] = p.y + pl.order[w.begin + i] * p.sy0;
  if (rank == 0) {  // base-only rows: y = bias (or 0)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t n = 0; n < N; ++n) ws.yr[i][n] = store_w<T>(pl.init[n]);
    return;
  }
  if (ws.packed != a) {
    const T* Aa = p.A + a * p.sa0;
    if (pl.a_in_place) {
      ws.a_rows = reinterpret_cast<const W*>(Aa);
      ws.lda = p.sa1;
    } else {
      for (int64_t j = 0; j < rank; ++j)
        for (int64_t k = 0; k < K; ++k) ws.apack[j * K + k] = load_w(Aa[j * p.sa1 + k * p.sa2]);
      ws.a_rows = ws.apack.data();
      ws.lda = K;
    }
    const T* Ba = p.B + a * p.sb0;  // bt[j, n] = B[a, n, j], columns N .. ldb zero
    W* bt = ws.bt.data();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < rank; ++j) bt[j * ldb + n] = load_w(Ba[n * p.sb1 + j * p.sb2]);
    for (int64_t j = 0; j < rank; ++j)
      for (int64_t n = N; n < ldb; ++n) bt[j * ldb + n] = W(0);
    ws.packed = a;
  }
  for (int64_t i = 0; i < rows; ++i) {
    const T* src = p.x + pl.order[w.begin + i] * p.sx0;
    if (pl.x_in_place) {
      ws.xr[i] = reinterpret_cast<const W*>(src);
    } else {
      W* dst = ws.xbuf.data() + i * K;
      for (int64_t k = 0; k < K; ++k) dst[k] = load_w(src[k * p.sx1]);
      ws.xr[i] = dst;
    }
  }
  shrink_rows<W>(ws.xr.data(), rows, K, ws.a_rows, ws.lda, rank, ws.u.data());
  const W s = static_cast<W>(p.scales[a]);
  for (int64_t q = 0; q < rows * rank; ++q) ws.u[q] *= s;
  expand_rows<T>(ws.u.data(), rows, rank, ws.bt.data(), ldb, pl.init, N, ws.yr.data());
}

}  // namespace

template <typename I>
int64_t lora_multi_segments(const I* adapter_index, int64_t M, int64_t n_adapters, int64_t* bounds,
                            int64_t* order) {
  std::fill(bounds, bounds + n_adapters + 2, int64_t(0));
  for (int64_t m = 0; m < M; ++m) {
    const int64_t v = static_cast<int64_t>(adapter_index[m]);
    if (v < -1 || v >= n_adapters) return m;
    ++bounds[v + 2];  // the size of bucket v + 1, at its end position
  }
  for (int64_t b = 1; b < n_adapters + 2; ++b) bounds[b] += bounds[b - 1];  // bounds[b] = start of bucket b
  std::vector<int64_t> next(bounds, bounds + n_adapters + 1);
  for (int64_t m = 0; m < M; ++m) order[next[static_cast<int64_t>(adapter_index[m]) + 1]++] = m;
  return -1;
}

template <typename T>
void lora_multi_lowrank_rows(const LoraMultiProblem<T>& p, const int64_t* bounds, const int64_t* order) {
  using W = work_t<T>;
  if (p.M == 0) return;
  const int64_t C = kCols<W>;
  // bt row stride: N rounded up to the column tile, plus one tile so that the r rows of bt do not all
  // fall into the same L1 cache set when N is a multiple of 1024 floats (4 KiB aliasing)
  const int64_t ldb = (p.N + C - 1) / C * C + C;
  std::vector<W> init(ldb, W(0));  // bias (or 0), zero-padded
  if (p.bias)
    for (int64_t n = 0; n < p.N; ++n) init[n] = load_w(p.bias[n * p.sbias]);

  const int64_t RB = rows_per_item(p.M);
  std::vector<Item> items;
  for (int64_t b = 0; b <= p.n_adapters; ++b)
    for (int64_t s = bounds[b]; s < bounds[b + 1]; s += RB) items.push_back({b, s, std::min(s + RB, bounds[b + 1])});
  const int64_t n_items = static_cast<int64_t>(items.size());
  constexpr bool same = std::is_same_v<T, W>;
  const Plan<T> plan{p, order, init.data(), ldb, same && p.sx1 == 1, same && p.sa2 == 1};
  const bool parallel = n_items > 1 && p.M * (p.K + p.N) * std::max<int64_t>(p.r_max, 1) >= (int64_t(1) << 17);

#pragma omp parallel if (parallel)
  {
    Workspace<T> ws(plan, RB);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) run_item<T>(plan, items[it], ws);
  }
}

template int64_t lora_multi_segments<int32_t>(const int32_t*, int64_t, int64_t, int64_t*, int64_t*);
template int64_t lora_multi_segments<int64_t>(const int64_t*, int64_t, int64_t, int64_t*, int64_t*);
template void lora_multi_lowrank_rows<float>(const LoraMultiProblem<float>&, const int64_t*, const int64_t*);
template void lora_multi_lowrank_rows<double>(const LoraMultiProblem<double>&, const int64_t*, const int64_t*);
template void lora_multi_lowrank_rows<bf16_t>(const LoraMultiProblem<bf16_t>&, const int64_t*, const int64_t*);

}  // namespace fastpeft
