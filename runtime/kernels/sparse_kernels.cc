// Sparse x dense products straight from values + packed bitmask (see sparse_kernels.h).
#include "sparse_kernels.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <thread>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FIPS_HAVE_AVX2 1
#else
#define FIPS_HAVE_AVX2 0
#endif

namespace fips {
namespace {

inline int popcnt32(unsigned x) { return __builtin_popcount(x); }

inline uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline bool bit_at(const uint8_t* mask, uint64_t p) { return (mask[p >> 3] >> (p & 7)) & 1u; }

// Number of set bits in the bit range [p0, p1) of the mask.
int64_t count_bits(const uint8_t* mask, uint64_t p0, uint64_t p1) {
  int64_t n = 0;
  while (p0 < p1 && (p0 & 7)) n += bit_at(mask, p0++);               // head, up to a byte
  for (; p0 + 64 <= p1; p0 += 64) n += __builtin_popcountll(load_u64(mask + (p0 >> 3)));
  for (; p0 + 8 <= p1; p0 += 8) n += popcnt32(mask[p0 >> 3]);
  while (p0 < p1) n += bit_at(mask, p0++);                             // tail bits
  return n;
}

// The 8 mask bits of columns [c, c+8) of a row, i.e. bits [p, p+8) with p = row*cols + c.
// A row starts at bit row*cols, which is byte-aligned only when cols % 8 == 0; otherwise the
// group straddles two bytes: take the high (8 - sh) bits of the first byte and the low sh
// bits of the next one. Never reads past mask[nbytes - 1].
inline unsigned bits8(const uint8_t* mask, size_t nbytes, uint64_t p) {
  const size_t b = static_cast<size_t>(p >> 3);
  const unsigned sh = static_cast<unsigned>(p & 7);
  unsigned v = mask[b];
  if (sh) {
    v >>= sh;
    if (b + 1 < nbytes) v |= static_cast<unsigned>(mask[b + 1]) << (8 - sh);
  }
  return v & 0xFFu;
}

// Fast variant when the group is byte-aligned (cols % 8 == 0): the byte itself.
template <bool ALIGNED>
inline unsigned group_bits(const uint8_t* mask, size_t nbytes, uint64_t p) {
  if (ALIGNED) return mask[p >> 3];
  return bits8(mask, nbytes, p);
}

inline unsigned low_bits(int n) { return n >= 8 ? 0xFFu : ((1u << n) - 1u); }

unsigned hw_threads() {
  static const unsigned n = [] {
    unsigned h = std::thread::hardware_concurrency();
    return h == 0 ? 1u : std::min(h, 256u);
  }();
  return n;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Token chunk per task for many-token products.
constexpr int64_t kTokenChunk = 64;
// Up to this many tokens, transB = 0 uses the row-walk kernel (Y rows kept in L1).
constexpr int64_t kSmallT = 2;

// Row slices for transB = 0 with few tokens: one per thread, at least 64 rows each.
int64_t nn_row_splits(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(static_cast<int64_t>(hw_threads()), rows / 64));
}

// Rows per task for transB = 1: about 4 tasks per thread, at least 8 rows.
int64_t nt_row_chunk(int64_t rows) {
  int64_t rc = ceil_div(rows, 4 * static_cast<int64_t>(hw_threads()));
  return std::max<int64_t>(8, std::min<int64_t>(rc, 256));
}

// Packs a callable into the (fn, arg) pair the TaskRunner wants.
template <class F>
void run_tasks(const TaskRunner& runner, size_t n, F&& f) {
  if (n == 0) return;
  struct Tramp {
    static void call(void* p, size_t i) { (*static_cast<F*>(p))(i); }
  };
  runner.run(n, &Tramp::call, static_cast<void*>(&f));
}

// ------------------------------------------------------------------------------------
// Portable scalar path (also the reference the SIMD path is tested against).
// ------------------------------------------------------------------------------------
void nn_scalar(const SparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
  const MaskTables& t = *V.t;
  const int64_t rows = t.rows, cols = t.cols, nch = t.nchunks;
  const int64_t ntok = ceil_div(T, kTokenChunk);
  run_tasks(runner, static_cast<size_t>(nch * ntok), [&](size_t task) {
    const int64_t j = static_cast<int64_t>(task) % nch, tk = static_cast<int64_t>(task) / nch;
    const int64_t c0 = j * kChunkCols, c1 = std::min(c0 + kChunkCols, cols);
    const int64_t t0 = tk * kTokenChunk, t1 = std::min(t0 + kTokenChunk, T);
    for (int64_t tt = t0; tt < t1; ++tt) std::fill(Y + tt * cols + c0, Y + tt * cols + c1, 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      const float* v = V.values + t.row_off[r] + t.chunk_off[r * nch + j];
      const uint64_t base = static_cast<uint64_t>(r) * cols;
      for (int64_t c = c0; c < c1; ++c) {
        if (!bit_at(V.mask, base + c)) continue;
        const float val = *v++;
        for (int64_t tt = t0; tt < t1; ++tt) Y[tt * cols + c] += A[tt * rows + r] * val;
      }
    }
  });
}

void nt_scalar(const SparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
  const MaskTables& t = *V.t;
  const int64_t rows = t.rows, cols = t.cols;
  const int64_t rc = nt_row_chunk(rows);
  const int64_t nrc = ceil_div(rows, rc), ntok = ceil_div(T, kTokenChunk);
  run_tasks(runner, static_cast<size_t>(nrc * ntok), [&](size_t task) {
    const int64_t i = static_cast<int64_t>(task) % nrc, tk = static_cast<int64_t>(task) / nrc;
    const int64_t r0 = i * rc, r1 = std::min(r0 + rc, rows);
    const int64_t t0 = tk * kTokenChunk, t1 = std::min(t0 + kTokenChunk, T);
    for (int64_t tt = t0; tt < t1; ++tt) {
      const float* a = A + tt * cols;
      for (int64_t r = r0; r < r1; ++r) {
        const float* v = V.values + t.row_off[r];
        const uint64_t base = static_cast<uint64_t>(r) * cols;
        float s = 0.0f;
        for (int64_t c = 0; c < cols; ++c)
          if (bit_at(V.mask, base + c)) s += *v++ * a[c];
        Y[tt * rows + r] = s;
      }
    }
  });
}

#if FIPS_HAVE_AVX2
// ------------------------------------------------------------------------------------
// AVX2 + FMA path.
// ------------------------------------------------------------------------------------

// Expansion table: for a mask byte m, lane j holds (0x80 | k) if bit j of m is set and it
// is the k-th set bit (k counted from bit 0), else 0. Sign-extended to int32 the low 3 bits
// are the source lane for _mm256_permutevar8x32_ps and the sign bit says "kept" (used by
// _mm256_blendv_ps to zero the other lanes). 256 x 8 bytes = 2 KiB.
struct ExpandLut {
  alignas(64) int8_t idx[256][8];
  ExpandLut() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int j = 0; j < 8; ++j)
        idx[m][j] = ((m >> j) & 1) ? static_cast<int8_t>(0x80 | k++) : static_cast<int8_t>(0);
    }
  }
};
const ExpandLut g_lut;

// Lanes [0, n) set.
inline __m256i lanes_lt(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The next 8 entries of `values` (only the first popcount(m) of them matter). SAFE: read
// just those (masked load, never touches memory past the array); else a plain load, valid
// whenever 8 floats are readable from v (rows < fast_rows).
template <bool SAFE>
inline __m256 load_vals(const float* v, unsigned m) {
  if (SAFE) return _mm256_maskload_ps(v, lanes_lt(popcnt32(m)));
  return _mm256_loadu_ps(v);
}

// Scatter the packed entries of `raw` to the lanes of the set bits of m, zero elsewhere:
// the dense 8 columns of the group.
inline __m256 expand8(__m256 raw, unsigned m) {
  const __m256i idx =
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(g_lut.idx[m])));
  const __m256 p = _mm256_permutevar8x32_ps(raw, idx);
  return _mm256_blendv_ps(_mm256_setzero_ps(), p, _mm256_castsi256_ps(idx));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---- transB = 0, few tokens: walk each row of V over one column chunk, y += a * x --------
// The TT output rows of the chunk (<= kChunkCols floats each) stay in L1.
template <int TT, bool ALIGNED, bool SAFE>
inline void nn_row(const uint8_t* mask, size_t nbytes, uint64_t base, const float* v,
                   const __m256* a, float* Y, int64_t ldy, int64_t c0, int64_t cfull, int ntail) {
  for (int64_t c = c0; c < cfull; c += 8) {
    const unsigned m = group_bits<ALIGNED>(mask, nbytes, base + c);
    const __m256 x = expand8(load_vals<SAFE>(v, m), m);
    v += popcnt32(m);
    for (int tt = 0; tt < TT; ++tt) {
      float* y = Y + tt * ldy + c;
      _mm256_storeu_ps(y, _mm256_fmadd_ps(a[tt], x, _mm256_loadu_ps(y)));
    }
  }
  if (ntail) {  // last ntail (< 8) columns of the row: masked bits, loads and stores
    const unsigned m = bits8(mask, nbytes, base + cfull) & low_bits(ntail);
    const __m256 x = expand8(load_vals<true>(v, m), m);
    const __m256i lanes = lanes_lt(ntail);
    for (int tt = 0; tt < TT; ++tt) {
      float* y = Y + tt * ldy + cfull;
      _mm256_maskstore_ps(y, lanes, _mm256_fmadd_ps(a[tt], x, _mm256_maskload_ps(y, lanes)));
    }
  }
}

// Four rows at a time (full groups, rows < fast_rows): one load/store of y per group for
// four expanded groups instead of one, y += a0*x0 + a1*x1 + a2*x2 + a3*x3 (summed in row
// order, so the result is the same as four single-row passes up to FMA contraction).
template <int TT, bool ALIGNED>
inline void nn_row4(const uint8_t* mask, uint64_t base, uint64_t row_bits, const float* v0,
                    const float* v1, const float* v2, const float* v3, const __m256 (*a)[4], float* Y,
                    int64_t ldy, int64_t c0, int64_t cfull) {
  for (int64_t c = c0; c < cfull; c += 8) {
    const uint64_t p = base + c;
    const unsigned m0 = group_bits<ALIGNED>(mask, 0, p);
    const unsigned m1 = group_bits<ALIGNED>(mask, 0, p + row_bits);
    const unsigned m2 = group_bits<ALIGNED>(mask, 0, p + 2 * row_bits);
    const unsigned m3 = group_bits<ALIGNED>(mask, 0, p + 3 * row_bits);
    const __m256 x0 = expand8(_mm256_loadu_ps(v0), m0);
    const __m256 x1 = expand8(_mm256_loadu_ps(v1), m1);
    const __m256 x2 = expand8(_mm256_loadu_ps(v2), m2);
    const __m256 x3 = expand8(_mm256_loadu_ps(v3), m3);
    v0 += popcnt32(m0);
    v1 += popcnt32(m1);
    v2 += popcnt32(m2);
    v3 += popcnt32(m3);
    for (int tt = 0; tt < TT; ++tt) {
      float* y = Y + tt * ldy + c;
      __m256 acc = _mm256_fmadd_ps(a[tt][0], x0, _mm256_loadu_ps(y));
      acc = _mm256_fmadd_ps(a[tt][1], x1, acc);
      acc = _mm256_fmadd_ps(a[tt][2], x2, acc);
      acc = _mm256_fmadd_ps(a[tt][3], x3, acc);
      _mm256_storeu_ps(y, acc);
    }
  }
}

// Rows [r0, r1) of V times the matching columns of A, over all columns, into P (TT rows of
// `cols` floats, overwritten). Rows are streamed in storage order (prefetch friendly).
template <int TT, bool ALIGNED>
void nn_small_rows(const SparseMatrix& V, const float* A, float* P, int64_t r0, int64_t r1) {
  const MaskTables& t = *V.t;
  const int64_t rows = t.rows, cols = t.cols;
  const int64_t cfull = cols & ~int64_t(7);
  const int ntail = static_cast<int>(cols - cfull);
  std::fill(P, P + TT * cols, 0.0f);
  int64_t r = r0;
  // The 4-row loop reads whole mask bytes, so it needs byte-aligned rows (cols % 8 == 0);
  // other rows, the tail rows near the end of `values`, and odd shapes go row by row.
  if (ALIGNED) {
    const int64_t r4_end = std::min(r1, t.fast_rows);
    for (; r + 4 <= r4_end; r += 4) {
      __m256 a[TT][4];
      for (int i = 0; i < 4; ++i)
        for (int tt = 0; tt < TT; ++tt) a[tt][i] = _mm256_set1_ps(A[tt * rows + r + i]);
      nn_row4<TT, ALIGNED>(V.mask, static_cast<uint64_t>(r) * cols, static_cast<uint64_t>(cols),
                           V.values + t.row_off[r], V.values + t.row_off[r + 1], V.values + t.row_off[r + 2],
                           V.values + t.row_off[r + 3], a, P, cols, 0, cfull);
    }
  }
  for (; r < r1; ++r) {
    const float* v = V.values + t.row_off[r];
    __m256 a[TT];
    for (int tt = 0; tt < TT; ++tt) a[tt] = _mm256_set1_ps(A[tt * rows + r]);
    const uint64_t base = static_cast<uint64_t>(r) * cols;
    if (r < t.fast_rows)
      nn_row<TT, ALIGNED, false>(V.mask, V.mask_bytes, base, v, a, P, cols, 0, cfull, ntail);
    else
      nn_row<TT, ALIGNED, true>(V.mask, V.mask_bytes, base, v, a, P, cols, 0, cfull, ntail);
  }
}

// ---- transB = 0, many tokens: register tile of TB tokens x 8 columns -----------------
// acc[tt] = Y[tt, c:c+8] accumulates a(tt, r) * x(r) over all rows r; x(r) is the expanded
// group of row r at column c, found through ptr[r] (values offset of row r at column c).
template <int TB, bool ALIGNED, bool SAFE>
inline void nn_tile_rows(const SparseMatrix& V, const float* A, int64_t lda, int64_t r0, int64_t r1,
                         uint64_t c, unsigned lowm, const int64_t* ptr, __m256* acc) {
  const int64_t cols = V.t->cols;
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t p = static_cast<uint64_t>(r) * cols + c;
    const unsigned m = (ALIGNED ? V.mask[p >> 3] : bits8(V.mask, V.mask_bytes, p)) & lowm;
    const __m256 x = expand8(load_vals<SAFE>(V.values + ptr[r], m), m);
    for (int tt = 0; tt < TB; ++tt)
      acc[tt] = _mm256_fmadd_ps(_mm256_broadcast_ss(A + tt * lda + r), x, acc[tt]);
  }
}

template <int TB, bool ALIGNED>
void nn_tile(const SparseMatrix& V, const float* A, float* Y, int64_t c, int n, const int64_t* ptr) {
  const MaskTables& t = *V.t;
  const int64_t rows = t.rows, cols = t.cols;
  __m256 acc[TB];
  for (int tt = 0; tt < TB; ++tt) acc[tt] = _mm256_setzero_ps();
  const unsigned lowm = low_bits(n);
  // ALIGNED here also needs a full group (n == 8) so the byte holds only this group's bits.
  if (n == 8) {
    nn_tile_rows<TB, ALIGNED, false>(V, A, rows, 0, t.fast_rows, c, lowm, ptr, acc);
    nn_tile_rows<TB, ALIGNED, true>(V, A, rows, t.fast_rows, rows, c, lowm, ptr, acc);
    for (int tt = 0; tt < TB; ++tt) _mm256_storeu_ps(Y + tt * cols + c, acc[tt]);
  } else {
    nn_tile_rows<TB, false, true>(V, A, rows, 0, rows, c, lowm, ptr, acc);
    const __m256i lanes = lanes_lt(n);
    for (int tt = 0; tt < TB; ++tt) _mm256_maskstore_ps(Y + tt * cols + c, lanes, acc[tt]);
  }
}

constexpr int kNNTile = 8;  // tokens per register tile (transB = 0)

template <bool ALIGNED>
void nn_tile_dispatch(int nb, const SparseMatrix& V, const float* A, float* Y, int64_t c, int n,
                      const int64_t* ptr) {
  switch (nb) {
    case 1: nn_tile<1, ALIGNED>(V, A, Y, c, n, ptr); break;
    case 2: nn_tile<2, ALIGNED>(V, A, Y, c, n, ptr); break;
    case 3: nn_tile<3, ALIGNED>(V, A, Y, c, n, ptr); break;
    case 4: nn_tile<4, ALIGNED>(V, A, Y, c, n, ptr); break;
    case 5: nn_tile<5, ALIGNED>(V, A, Y, c, n, ptr); break;
    case 6: nn_tile<6, ALIGNED>(V, A, Y, c, n, ptr); break;
    case 7: nn_tile<7, ALIGNED>(V, A, Y, c, n, ptr); break;
    default: nn_tile<8, ALIGNED>(V, A, Y, c, n, ptr); break;
  }
}

template <bool ALIGNED>
void nn_large_task(const SparseMatrix& V, const float* A, int64_t T, float* Y, int64_t j, int64_t tk) {
  const MaskTables& t = *V.t;
  const int64_t rows = t.rows, cols = t.cols, nch = t.nchunks;
  const int64_t c0 = j * kChunkCols, c1 = std::min(c0 + kChunkCols, cols);
  const int64_t t0 = tk * kTokenChunk, t1 = std::min(t0 + kTokenChunk, T);
  // ptr[r]: values offset of row r at the current column; advanced group by group.
  thread_local std::vector<int64_t> ptr_buf;
  ptr_buf.resize(static_cast<size_t>(rows));
  int64_t* ptr = ptr_buf.data();
  for (int64_t r = 0; r < rows; ++r) ptr[r] = t.row_off[r] + t.chunk_off[r * nch + j];
  for (int64_t c = c0; c < c1; c += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, c1 - c));
    for (int64_t tb = t0; tb < t1; tb += kNNTile) {
      const int nb = static_cast<int>(std::min<int64_t>(kNNTile, t1 - tb));
      nn_tile_dispatch<ALIGNED>(nb, V, A + tb * rows, Y + tb * cols, c, n, ptr);
    }
    const unsigned lowm = low_bits(n);
    for (int64_t r = 0; r < rows; ++r)
      ptr[r] += popcnt32(bits8(V.mask, V.mask_bytes, static_cast<uint64_t>(r) * cols + c) & lowm);
  }
}

template <bool ALIGNED>
void nn_avx2(const SparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
  const int64_t rows = V.t->rows, cols = V.t->cols, nch = V.t->nchunks;
  if (T <= kSmallT) {
    // Split the rows of V (the reduction dimension) into nsplit slices, each summed into its
    // own partial output, then add the partials in slice order: sequential streaming of
    // values/mask, and the result does not depend on which thread ran which slice.
    const int64_t nsplit = nn_row_splits(rows);
    const int64_t per = ceil_div(rows, nsplit);
    std::vector<float> partial(static_cast<size_t>((nsplit - 1) * T * cols));
    run_tasks(runner, static_cast<size_t>(nsplit), [&](size_t i) {
      const int64_t r0 = static_cast<int64_t>(i) * per, r1 = std::min(r0 + per, rows);
      float* P = i == 0 ? Y : partial.data() + (i - 1) * T * cols;
      if (T == 1) nn_small_rows<1, ALIGNED>(V, A, P, r0, r1);
      else nn_small_rows<2, ALIGNED>(V, A, P, r0, r1);
    });
    const int64_t n = T * cols;
    for (int64_t i = 1; i < nsplit; ++i) {
      const float* P = partial.data() + (i - 1) * n;
      int64_t k = 0;
      for (; k + 8 <= n; k += 8) _mm256_storeu_ps(Y + k, _mm256_add_ps(_mm256_loadu_ps(Y + k), _mm256_loadu_ps(P + k)));
      for (; k < n; ++k) Y[k] += P[k];
    }
    return;
  }
  const int64_t ntok = ceil_div(T, kTokenChunk);
  run_tasks(runner, static_cast<size_t>(nch * ntok), [&](size_t task) {
    const int64_t j = static_cast<int64_t>(task) % nch, tk = static_cast<int64_t>(task) / nch;
    nn_large_task<ALIGNED>(V, A, T, Y, j, tk);
  });
}

// ---- transB = 1: dot products of rows of V with TB token rows of A --------------------
// U independent accumulator sets (U groups per iteration) hide the FMA latency when TB is
// small.
template <int TB, int U, bool ALIGNED, bool SAFE>
inline void nt_row(const uint8_t* mask, size_t nbytes, uint64_t base, const float* v,
                   const float* A, int64_t cols, float* out, int64_t ldy) {
  __m256 acc[U][TB];
  for (int u = 0; u < U; ++u)
    for (int tt = 0; tt < TB; ++tt) acc[u][tt] = _mm256_setzero_ps();
  const int64_t cfull = cols & ~int64_t(7);
  int64_t c = 0;
  for (; c + 8 * U <= cfull; c += 8 * U) {
    for (int u = 0; u < U; ++u) {
      const unsigned m = group_bits<ALIGNED>(mask, nbytes, base + c + 8 * u);
      const __m256 x = expand8(load_vals<SAFE>(v, m), m);
      v += popcnt32(m);
      for (int tt = 0; tt < TB; ++tt)
        acc[u][tt] = _mm256_fmadd_ps(x, _mm256_loadu_ps(A + tt * cols + c + 8 * u), acc[u][tt]);
    }
  }
  for (; c < cfull; c += 8) {
    const unsigned m = group_bits<ALIGNED>(mask, nbytes, base + c);
    const __m256 x = expand8(load_vals<SAFE>(v, m), m);
    v += popcnt32(m);
    for (int tt = 0; tt < TB; ++tt)
      acc[0][tt] = _mm256_fmadd_ps(x, _mm256_loadu_ps(A + tt * cols + c), acc[0][tt]);
  }
  if (c < cols) {  // tail: fewer than 8 columns left; masked bits and masked A loads
    const int n = static_cast<int>(cols - c);
    const unsigned m = bits8(mask, nbytes, base + c) & low_bits(n);
    const __m256 x = expand8(load_vals<true>(v, m), m);
    const __m256i lanes = lanes_lt(n);
    for (int tt = 0; tt < TB; ++tt)
      acc[0][tt] = _mm256_fmadd_ps(x, _mm256_maskload_ps(A + tt * cols + c, lanes), acc[0][tt]);
  }
  for (int tt = 0; tt < TB; ++tt) {
    __m256 s = acc[0][tt];
    for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[u][tt]);
    out[tt * ldy] = hsum(s);
  }
}

constexpr int kNTTile = 4;  // tokens per register block (transB = 1)

template <int TB, bool ALIGNED>
void nt_rows(const SparseMatrix& V, const float* A, float* Y, int64_t r0, int64_t r1) {
  constexpr int U = TB == 1 ? 4 : (TB == 2 ? 2 : 1);
  const MaskTables& t = *V.t;
  const int64_t rows = t.rows, cols = t.cols;
  for (int64_t r = r0; r < r1; ++r) {
    const float* v = V.values + t.row_off[r];
    const uint64_t base = static_cast<uint64_t>(r) * cols;
    if (r < t.fast_rows)
      nt_row<TB, U, ALIGNED, false>(V.mask, V.mask_bytes, base, v, A, cols, Y + r, rows);
    else
      nt_row<TB, U, ALIGNED, true>(V.mask, V.mask_bytes, base, v, A, cols, Y + r, rows);
  }
}

template <bool ALIGNED>
void nt_avx2(const SparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
  const int64_t rows = V.t->rows, cols = V.t->cols;
  const int64_t rc = nt_row_chunk(rows);
  const int64_t nrc = ceil_div(rows, rc), ntok = ceil_div(T, kTokenChunk);
  run_tasks(runner, static_cast<size_t>(nrc * ntok), [&](size_t task) {
    const int64_t i = static_cast<int64_t>(task) % nrc, tk = static_cast<int64_t>(task) / nrc;
    const int64_t r0 = i * rc, r1 = std::min(r0 + rc, rows);
    const int64_t t0 = tk * kTokenChunk, t1 = std::min(t0 + kTokenChunk, T);
    for (int64_t tb = t0; tb < t1; tb += kNTTile) {
      const int nb = static_cast<int>(std::min<int64_t>(kNTTile, t1 - tb));
      const float* a = A + tb * cols;
      float* y = Y + tb * rows;
      switch (nb) {
        case 1: nt_rows<1, ALIGNED>(V, a, y, r0, r1); break;
        case 2: nt_rows<2, ALIGNED>(V, a, y, r0, r1); break;
        case 3: nt_rows<3, ALIGNED>(V, a, y, r0, r1); break;
        default: nt_rows<4, ALIGNED>(V, a, y, r0, r1); break;
      }
    }
  });
}
#endif  // FIPS_HAVE_AVX2

}  // namespace

bool simd_enabled() {
#if FIPS_HAVE_AVX2
  static const bool on = [] {
    const char* e = std::getenv("FIPS_SPARSE_FORCE_SCALAR");
    return !(e && e[0] && e[0] != '0');
  }();
  return on;
#else
  return false;
#endif
}

const char* kernel_isa() { return simd_enabled() ? "avx2-fma" : "scalar"; }

void build_tables(const uint8_t* mask, int64_t rows, int64_t cols, bool with_chunks, MaskTables* out) {
  out->rows = rows;
  out->cols = cols;
  out->nchunks = with_chunks ? ceil_div(cols, kChunkCols) : 0;
  out->row_off.assign(static_cast<size_t>(rows) + 1, 0);
  out->chunk_off.assign(static_cast<size_t>(rows * out->nchunks), 0u);
  for (int64_t r = 0; r < rows; ++r) {
    const uint64_t base = static_cast<uint64_t>(r) * cols;
    int64_t in_row = 0;
    if (with_chunks) {
      for (int64_t j = 0; j < out->nchunks; ++j) {
        out->chunk_off[r * out->nchunks + j] = static_cast<uint32_t>(in_row);
        const int64_t c0 = j * kChunkCols, c1 = std::min(c0 + kChunkCols, cols);
        in_row += count_bits(mask, base + c0, base + c1);
      }
    } else {
      in_row = count_bits(mask, base, base + cols);
    }
    out->row_off[r + 1] = out->row_off[r] + in_row;
  }
  out->nnz = out->row_off[rows];
  // A group load reads 8 floats starting at most at the row's end offset.
  int64_t fr = 0;
  while (fr < rows && out->row_off[fr + 1] + 8 <= out->nnz) ++fr;
  out->fast_rows = fr;
}

void spmm_nn(const SparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
  if (T <= 0 || V.t->cols == 0) return;
#if FIPS_HAVE_AVX2
  if (simd_enabled()) {
    if (V.t->cols % 8 == 0) nn_avx2<true>(V, A, T, Y, runner);
    else nn_avx2<false>(V, A, T, Y, runner);
    return;
  }
#endif
  nn_scalar(V, A, T, Y, runner);
}

void spmm_nt(const SparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
  if (T <= 0 || V.t->rows == 0) return;
#if FIPS_HAVE_AVX2
  if (simd_enabled()) {
    if (V.t->cols % 8 == 0) nt_avx2<true>(V, A, T, Y, runner);
    else nt_avx2<false>(V, A, T, Y, runner);
    return;
  }
#endif
  nt_scalar(V, A, T, Y, runner);
}

}  // namespace fips
