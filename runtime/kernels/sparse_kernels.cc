// Sparse x dense products straight from values + packed bitmask (see sparse_kernels.h).
//
// One kernel level per compilation of this file (runtime/kernel_build.py): the build compiles
// it once per level with -DFIPS_KERNEL_LEVEL=N and that level's instruction-set flags, and each
// compilation defines its products in its own namespace, fips::portable / fips::avx2 /
// fips::avx512. sparse_dispatch.cc picks one at run time from the CPU's features.
//   0 portable  no -m flags: the scalar loops (the only level on non-x86 targets)
//   1 avx2      -mavx2 -mfma -mpopcnt: the AVX2 + FMA kernels
//   2 avx512    -mavx512f -mavx2 -mfma -mpopcnt: the AVX2 kernels, with AVX-512F few-token and
//               many-token inner loops where the rows are byte-aligned
// Code of a level runs only after the dispatcher has checked the CPU, so nothing in this file
// may run when the library is loaded: no dynamic initializers at namespace scope (the tables
// below are constexpr), and everything is in the level's namespace.
#include "sparse_kernels.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>

#ifndef FIPS_KERNEL_LEVEL
#error "compile with -DFIPS_KERNEL_LEVEL=0|1|2 and the level's flags (see runtime/kernel_build.py)"
#endif
#if FIPS_KERNEL_LEVEL == 0
#define FIPS_LEVEL_NS portable
#define FIPS_HAVE_AVX2 0
#define FIPS_HAVE_AVX512 0
#elif FIPS_KERNEL_LEVEL == 1 || FIPS_KERNEL_LEVEL == 2
#if !(defined(__AVX2__) && defined(__FMA__) && defined(__POPCNT__))
#error "kernel levels 1 and 2 need -mavx2 -mfma -mpopcnt"
#endif
#include <immintrin.h>
#define FIPS_HAVE_AVX2 1
#if FIPS_KERNEL_LEVEL == 2
#ifndef __AVX512F__
#error "kernel level 2 needs -mavx512f"
#endif
#define FIPS_LEVEL_NS avx512
// AVX-512F: the few-token kernels read 16 mask bits per step and expand the kept values with
// one vexpandps instead of a table permute; the many-token ones use 16 lanes.
#define FIPS_HAVE_AVX512 1
#else
#define FIPS_LEVEL_NS avx2
#define FIPS_HAVE_AVX512 0
#endif
#else
#error "FIPS_KERNEL_LEVEL must be 0 (portable), 1 (avx2) or 2 (avx512)"
#endif

#include "mask_walk.h"  // ceil_div, bit_at, bits8, low_bits, RowBits, run_tasks, balanced_rows, add_partials

namespace fips {
namespace FIPS_LEVEL_NS {
namespace {

inline int popcnt32(unsigned x) { return __builtin_popcount(x); }

// 0 = scalar, 1 = AVX2 + FMA, 2 = AVX-512F (few-token kernels): fixed by this compilation.
constexpr int simd_level() { return FIPS_HAVE_AVX512 ? 2 : (FIPS_HAVE_AVX2 ? 1 : 0); }

// Token chunk per task (scalar path, and transB = 1 below kBigTnt).
constexpr int64_t kTokenChunk = 64;
// Kernel choice by token count T (measured on a 2-core AMD EPYC, Zen 3):
//   transB = 0: T <= kWalkT: row walk, y += a * x, the T output rows kept in L1, rows of V
//               split 8 ways with partial sums; T < kBigTnn: the same per block of kWalkT
//               tokens; else the entry-list kernel over 32-token blocks (nn_big_task).
//   transB = 1: T < kBigTnt: dot products, register block of kNTTile tokens; else the
//               entry-list kernel (nt_big_task).
//   Both: kMidMinT <= T <= kMidMaxT: the multi-row kernels (nn_mid / nt_mid) instead.
constexpr int64_t kWalkT = 8;
constexpr int64_t kBigTnn = 16;
constexpr int64_t kBigTnt = 24;
// Multi-row decode (a batch of kMidMinT..kMidMaxT sequences, one token each: fips serve): both
// products use the entry-list kernels with ONE block of 16 tokens (A^T [K, 16]), so each mask group
// is decoded once per call and each kept entry is one broadcast-FMA over the T tokens (one zmm with
// AVX-512F, two ymm with AVX2), instead of ceil(T / 4) (transB = 1) or ceil(T / 8) (transB = 0)
// passes over V that each expand every group. Measured (benchmarks/results/kernel_bench_multirow.md,
// 1 thread, SmolLM2 V shapes streamed from memory, Intel Xeon AVX-512 and AVX2 levels): 1.1-1.9x
// faster at T = 9..16; at T = 5 and 8 an 8-token variant was slower or no better than the
// few-token kernels, hence kMidMinT = 9. FIPS_SPARSE_MULTIROW=0 turns it off (the few-token
// kernels as before; for benchmarks and A/B tests).
constexpr int64_t kMidMinT = 9;
constexpr int64_t kMidMaxT = 16;

// Work splits are fixed numbers, not derived from the thread count, so the floating-point
// summation order (and thus every output bit) is the same on every machine and for every
// intra_op_num_threads. Several tasks per thread let onnxruntime's pool balance the load
// when a core is busy with something else.

// Row slices (partial sums) for transB = 0 with few tokens: up to 8, >= 64 rows each.
[[maybe_unused]] int64_t nn_row_splits(int64_t rows) { return std::max<int64_t>(1, std::min<int64_t>(8, rows / 64)); }

// Rows per task for transB = 1: 64 (fewer for small matrices so there are >= 8 tasks).
int64_t nt_row_chunk(int64_t rows) { return std::max<int64_t>(8, std::min<int64_t>(64, ceil_div(rows, 8))); }

// FIPS_SPARSE_MULTIROW=0: no multi-row kernels (read once per process).
[[maybe_unused]] bool multirow_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("FIPS_SPARSE_MULTIROW");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  return on;
}

#if !FIPS_HAVE_AVX2
// ------------------------------------------------------------------------------------
// Portable scalar path (level 0; also the reference the SIMD levels are tested against).
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

#endif  // !FIPS_HAVE_AVX2

#if FIPS_HAVE_AVX2
// ------------------------------------------------------------------------------------
// AVX2 + FMA path.
// ------------------------------------------------------------------------------------

// Expansion table: for a mask byte m, lane j holds (0x80 | k) if bit j of m is set and it
// is the k-th set bit (k counted from bit 0), else 0. Sign-extended to int32 the low 3 bits
// are the source lane for _mm256_permutevar8x32_ps and the sign bit says "kept" (used by
// _mm256_blendv_ps to zero the other lanes). 256 x 8 bytes = 2 KiB.
struct ExpandLut {
  alignas(64) int8_t idx[256][8] = {};
  constexpr ExpandLut() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int j = 0; j < 8; ++j)
        idx[m][j] = ((m >> j) & 1) ? static_cast<int8_t>(0x80 | k++) : static_cast<int8_t>(0);
    }
  }
};
constexpr ExpandLut g_lut{};  // constant-initialized: no code runs at load

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

// Software prefetch of the weights the next row block will read, spread evenly over the
// iterations of the current block: iteration `it` touches byte (it * bytes / iters) of the
// next block's values (and of its mask bits). The hardware prefetchers alone leave the
// few-token kernels waiting on memory (measured on SmolLM2 shapes, one thread, weights
// streamed from DRAM: 1.76 -> 1.00 ns per 8 mask positions for transB = 0). Prefetches never
// fault, so addresses past the end of the arrays are harmless.
struct Prefetch {
  const char* p = nullptr;
  uint64_t step = 0;  // bytes per iteration, 16.16 fixed point
  Prefetch() = default;
  Prefetch(const void* start, int64_t bytes, int64_t iters)
      : p(static_cast<const char*>(start)),
        step(iters > 0 && bytes > 0 ? (static_cast<uint64_t>(bytes) << 16) / static_cast<uint64_t>(iters) : 0) {}
  // no branch on step == 0 (an empty range prefetches p again): GCC 12 dropped the prefetch
  // altogether when it was guarded by `if (step)`
  inline void at(int64_t it) const { _mm_prefetch(p + ((static_cast<uint64_t>(it) * step) >> 16), _MM_HINT_T0); }
};

// Values and mask prefetchers for rows [r0, r1) of V, spread over `iters` iterations.
struct RowsPrefetch {
  Prefetch values, mask;
  RowsPrefetch(const SparseMatrix& V, int64_t r0, int64_t r1, int64_t iters) {
    const MaskTables& t = *V.t;
    r0 = std::min(r0, t.rows);
    r1 = std::min(r1, t.rows);
    if (r1 <= r0) return;
    values = Prefetch(V.values + t.row_off[r0], (t.row_off[r1] - t.row_off[r0]) * 4, iters);
    const uint64_t b0 = (static_cast<uint64_t>(r0) * t.cols) >> 3, b1 = (static_cast<uint64_t>(r1) * t.cols + 7) >> 3;
    // one prefetch per 64 bytes of mask is enough: issue it every (iters * 64 / bytes) iterations
    mask = Prefetch(V.mask + b0, static_cast<int64_t>(b1 - b0), iters);
  }
  inline void at(int64_t it) const {
    values.at(it);
    if ((it & 7) == 0) mask.at(it);
  }
};

// ---- many tokens: walk the kept entries, vectorize over 32 tokens --------------------
// For many tokens each kept entry v at (r, c) is used for a block of kTB = 32 tokens at once:
// broadcast v, multiply by the 32 token values of the matching input column and add into
// the 32 accumulators of the output row. Inputs are first transposed to "token-minor"
// blocks (AT[k * 32 + j] = A[t0 + j, k]) so those 32 values are 4 contiguous vectors.
// The kept entries of a row are listed by decode_cols: per mask group, the positions of its
// set bits (compress table) plus the group's column are stored at the running count, which
// then advances by popcount(m) -- a short int32 list per row, rebuilt per token block, never
// stored with the weight.
constexpr int kTB = 32;
constexpr int kTBShift = 5;  // log2(kTB)

constexpr int log2i(int x) { return x <= 1 ? 0 : 1 + log2i(x / 2); }

// Compress table: lane k = column (0..7) of the k-th set bit of m.
struct CompressLut {
  alignas(64) int8_t pos[256][8] = {};
  constexpr CompressLut() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int j = 0; j < 8; ++j)
        if ((m >> j) & 1) pos[m][k++] = static_cast<int8_t>(j);
      for (; k < 8; ++k) pos[m][k] = 0;
    }
  }
};
constexpr CompressLut g_cmp{};  // constant-initialized

// Columns of the kept entries of the row starting at bit `base`, restricted to [c0, c1),
// as offsets (c - c0) << SHIFT into a transposed block of 2^SHIFT tokens; returns their number. Each group
// stores 8 lanes at idx + k (the lanes past its popcount are overwritten by the next
// group), so idx needs c1 - c0 + 8 slots.
template <bool ALIGNED, int SHIFT = kTBShift>
inline int decode_cols(const uint8_t* mask, size_t nbytes, uint64_t base, int64_t c0, int64_t c1, int32_t* idx) {
  int k = 0;
  const RowBits<ALIGNED> bits(mask, nbytes, base);
  int64_t c = c0;
  for (; c + 8 <= c1; c += 8) {
    const unsigned m = bits(c);
    const __m256i pos = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(g_cmp.pos[m])));
    const __m256i col = _mm256_add_epi32(pos, _mm256_set1_epi32(static_cast<int32_t>(c - c0)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + k), _mm256_slli_epi32(col, SHIFT));
    k += popcnt32(m);
  }
  if (c < c1) {
    const unsigned m = bits8(mask, nbytes, base + c) & low_bits(static_cast<int>(c1 - c));
    const __m256i pos = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(g_cmp.pos[m])));
    const __m256i col = _mm256_add_epi32(pos, _mm256_set1_epi32(static_cast<int32_t>(c - c0)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + k), _mm256_slli_epi32(col, SHIFT));
    k += popcnt32(m);
  }
  return k;
}

#if FIPS_HAVE_AVX512
// decode_cols for byte-aligned rows (`row`: the row's first mask byte) with AVX-512F: 16 columns per
// step, the column offsets of the set bits packed with one vpcompressd. c0 is a multiple of 8 and
// c1 - c0 a multiple of 8 (cols % 8 == 0); idx needs c1 - c0 + 16 slots.
template <int SHIFT>
inline int decode_cols16(const uint8_t* row, int64_t c0, int64_t c1, int32_t* idx) {
  __m512i col = _mm512_slli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), SHIFT);
  const __m512i step = _mm512_set1_epi32(16 << SHIFT);
  int k = 0;
  int64_t c = c0;
  for (; c + 16 <= c1; c += 16) {
    uint16_t m;
    std::memcpy(&m, row + (c >> 3), sizeof(m));
    _mm512_storeu_si512(idx + k, _mm512_maskz_compress_epi32(static_cast<__mmask16>(m), col));
    k += popcnt32(m);
    col = _mm512_add_epi32(col, step);
  }
  if (c < c1) {  // the last 8 columns
    const unsigned m = row[c >> 3];
    _mm512_storeu_si512(idx + k, _mm512_maskz_compress_epi32(static_cast<__mmask16>(m), col));
    k += popcnt32(m);
  }
  return k;
}
#endif

// The kept columns of row r in [c0, c1) for a task of the entry-list kernels (WIDE: AVX-512F ops).
template <bool ALIGNED, int SHIFT, bool WIDE>
inline int row_cols(const SparseMatrix& V, int64_t r, int64_t c0, int64_t c1, int32_t* idx) {
  const uint64_t base = static_cast<uint64_t>(r) * V.t->cols;
#if FIPS_HAVE_AVX512
  if constexpr (ALIGNED && WIDE) return decode_cols16<SHIFT>(V.mask + (base >> 3), c0, c1, idx);
#endif
  return decode_cols<ALIGNED, SHIFT>(V.mask, V.mask_bytes, base, c0, c1, idx);
}

// AT[k * tb + j] = A[(t0 + j) * lda + k] for k < width, j < nt; 0 for nt <= j < tb (tb = the
// token block width: kTB for many tokens, 16 for the multi-row kernels).
// A float buffer aligned to 64 bytes: every 32-token row of a transposed block (128 bytes) then
// starts on a cache line, so no 32- or 64-byte load of it splits across two lines.
struct AlignedFloats {
  float* p = nullptr;
  size_t cap = 0;
  AlignedFloats() = default;
  explicit AlignedFloats(size_t n) { reserve(n); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
  ~AlignedFloats() { std::free(p); }
  void reserve(size_t n) {
    if (n <= cap) return;
    std::free(p);
    p = static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64));
    if (!p) throw std::bad_alloc();
    cap = n;
  }
  float* data() const { return p; }
};

// Tiled over 16 columns of A so the 16 x 32 destination tile stays in L1 while each source row
// is read 64 contiguous bytes at a time.
void transpose_block(const float* A, int64_t lda, int64_t width, int64_t t0, int nt, float* AT, int tb = kTB) {
  if (nt < tb) std::fill(AT, AT + width * tb, 0.0f);
  constexpr int64_t kTile = 16;
  for (int64_t k0 = 0; k0 < width; k0 += kTile) {
    const int64_t k1 = std::min(k0 + kTile, width);
    for (int j = 0; j < nt; ++j) {
      const float* src = A + (t0 + j) * lda;
      for (int64_t k = k0; k < k1; ++k) AT[k * tb + j] = src[k];
    }
  }
}

// A [T, K] -> ceil(T / 32) token blocks, block b = [K, 32] (the layout transpose_block writes),
// done once per call, before the tasks: each task then reads its block instead of
// re-transposing it (the column-chunk tasks of transB = 0 and the row-chunk tasks of
// transB = 1 would otherwise transpose the same tokens 12 and 4 times for SmolLM2 shapes).
void transpose_all(const float* A, int64_t T, int64_t K, const TaskRunner& runner, AlignedFloats& out,
                   int tb = kTB) {
  const int64_t nblk = ceil_div(T, tb);
  out.reserve(static_cast<size_t>(nblk * K * tb));
  if (nblk == 1) {  // one block (the multi-row kernels): no task round trip for a few KiB
    transpose_block(A, K, K, 0, static_cast<int>(T), out.data(), tb);
    return;
  }
  run_tasks(runner, static_cast<size_t>(nblk), [&](size_t b) {
    const int64_t t0 = static_cast<int64_t>(b) * tb;
    transpose_block(A, K, K, t0, static_cast<int>(std::min<int64_t>(tb, T - t0)), out.data() + b * K * tb, tb);
  });
}

// A grow-only buffer (no std::vector here: its out-of-line members would be weak symbols shared
// with the baseline objects, see runtime/kernel_build.py; contents are not kept on growth).
template <class T>
struct Scratch {
  std::unique_ptr<T[]> p;
  size_t n = 0;
  T* get(size_t need) {
    if (need > n) {
      p.reset(new T[need]);
      n = need;
    }
    return p.get();
  }
};

struct BigScratch {
  AlignedFloats yt;
  Scratch<int32_t> idx;
  Scratch<int64_t> ptr;
};
BigScratch& big_scratch() {
  thread_local BigScratch s;
  return s;
}

// The inner loops of the entry-list kernels, for token blocks of TB tokens (kTB = 32 for many
// tokens, 16 for the multi-row decode kernels): AVX2 here, AVX-512F below (Avx512OpsT); the
// tasks that call them (nt_big_task, nn_big_task) are shared. NV vectors hold the TB tokens of one
// entry; dot_entries keeps U independent accumulator sets (entries k, k+1, .., k+U-1 of each step;
// a tail entry goes to set 0) so that U * NV FMA chains are in flight, and adds the sets pairwise
// at the end ((s0 + s1) + (s2 + s3) ...): a fixed order, whatever the thread count.
template <class Vec, int NV, int U>
struct EntryLoops {
  static inline void dot_entries(const float* AT, const int32_t* idx, const float* v, int n, float* out) {
    typename Vec::type acc[U][NV];
    for (int q = 0; q < NV; ++q) {
      acc[0][q] = Vec::load(out + Vec::W * q);
      for (int u = 1; u < U; ++u) acc[u][q] = Vec::zero();
    }
    int k = 0;
    for (; k + U <= n; k += U) {
      for (int u = 0; u < U; ++u) {
        const float* p = AT + idx[k + u];
        const typename Vec::type w = Vec::bcast(v + k + u);
        for (int q = 0; q < NV; ++q) acc[u][q] = Vec::fma(w, Vec::load(p + Vec::W * q), acc[u][q]);
      }
    }
    for (; k < n; ++k) {
      const float* p = AT + idx[k];
      const typename Vec::type w = Vec::bcast(v + k);
      for (int q = 0; q < NV; ++q) acc[0][q] = Vec::fma(w, Vec::load(p + Vec::W * q), acc[0][q]);
    }
    for (int st = 1; st < U; st *= 2)
      for (int u = 0; u + st < U; u += 2 * st)
        for (int q = 0; q < NV; ++q) acc[u][q] = Vec::add(acc[u][q], acc[u + st][q]);
    for (int q = 0; q < NV; ++q) Vec::store(out + Vec::W * q, acc[0][q]);
  }
  // YT[idx[k] : idx[k] + TB) += v[k] * a[0:TB) (the columns of one row are distinct: no dependency)
  static inline void axpy_entries(const float* a, const int32_t* idx, const float* v, int n, float* YT) {
    typename Vec::type x[NV];
    for (int q = 0; q < NV; ++q) x[q] = Vec::load(a + Vec::W * q);
    for (int k = 0; k < n; ++k) {
      float* y = YT + idx[k];
      const typename Vec::type wv = Vec::bcast(v + k);
      for (int q = 0; q < NV; ++q) Vec::store(y + Vec::W * q, Vec::fma(wv, x[q], Vec::load(y + Vec::W * q)));
    }
  }
};

struct Ymm {
  using type = __m256;
  static constexpr int W = 8;
  static inline type load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, type x) { _mm256_storeu_ps(p, x); }
  static inline type zero() { return _mm256_setzero_ps(); }
  static inline type bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static inline type fma(type a, type b, type c) { return _mm256_fmadd_ps(a, b, c); }
  static inline type add(type a, type b) { return _mm256_add_ps(a, b); }
};

// AVX2: TB / 8 ymm per entry; 2 accumulator sets for 32 tokens, 4 for 16.
template <int TB>
struct Avx2OpsT : EntryLoops<Ymm, TB / 8, (TB >= 32 ? 2 : 4)> {
  static_assert(TB == 16 || TB == 32, "token blocks of 16 or 32");
  static constexpr int kTokens = TB;
  static constexpr bool kWide = false;
};
using Avx2Ops = Avx2OpsT<kTB>;

// transB = 1: rows [r0, r1) of Y for tokens [t0, t0 + nt). The columns are walked in chunks
// of kChunkCols so the transposed slice of A (kChunkCols x 32 floats = 16 KiB) stays in L1;
// per-row partial sums (32 floats per row) carry over from chunk to chunk. ATb: the token
// block transposed by transpose_all, [cols, 32].
// cw: the chunk width (kChunkCols; the multi-row kernels pass cols: one chunk, V read row after row
// in storage order, the whole transposed A -- cols x 16 floats -- L2 resident).
template <bool ALIGNED, class Ops>
void nt_big_task(const SparseMatrix& V, const float* ATb, float* Y, int64_t r0, int64_t r1, int64_t t0, int nt,
                 int64_t cw = kChunkCols) {
  constexpr int TB = Ops::kTokens;
  constexpr int SH = log2i(TB);
  const MaskTables& t = *V.t;
  const int64_t rows = t.rows, cols = t.cols, nr = r1 - r0;
  BigScratch& sc = big_scratch();
  sc.yt.reserve(static_cast<size_t>(nr * TB));
  std::fill(sc.yt.data(), sc.yt.data() + nr * TB, 0.0f);
  float* acc_rows = sc.yt.data();
  int32_t* idx = sc.idx.get(static_cast<size_t>(cw + 16));
  int64_t* ptr = sc.ptr.get(static_cast<size_t>(nr));
  for (int64_t i = 0; i < nr; ++i) ptr[i] = t.row_off[r0 + i];
  for (int64_t c0 = 0; c0 < cols; c0 += cw) {
    const int64_t c1 = std::min(c0 + cw, cols);
    const float* AT = ATb + c0 * TB;
    for (int64_t i = 0; i < nr; ++i) {
      if (t.row_off[r0 + i + 1] == t.row_off[r0 + i]) continue;  // a pruned-away row
      const int n = row_cols<ALIGNED, SH, Ops::kWide>(V, r0 + i, c0, c1, idx);
      if (n == 0) continue;
      Ops::dot_entries(AT, idx, V.values + ptr[i], n, acc_rows + i * TB);
      ptr[i] += n;
    }
  }
  for (int64_t i = 0; i < nr; ++i)
    for (int j = 0; j < nt; ++j) Y[(t0 + j) * rows + r0 + i] = acc_rows[i * TB + j];
}

// transB = 0: columns [c0, c1) (chunk j) of Y for tokens [t0, t0 + nt). YT[(c - c0) * kTB + jj]
// accumulates A[t0 + jj, r] * V[r, c] over the rows r in storage order. AT: the token block
// transposed by transpose_all, [rows, 32].
// With a block of 16 tokens (the multi-row kernels: V streamed from memory, little work per entry)
// the chunk of row r + kMidAhead is prefetched while row r is done.
constexpr int64_t kMidAhead = 4;

// span: chunks per task (columns [j * kChunkCols, (j + span) * kChunkCols)).
template <bool ALIGNED, class Ops>
void nn_big_task(const SparseMatrix& V, const float* AT, float* Y, int64_t j, int64_t t0, int nt, int64_t span = 1) {
  constexpr int TB = Ops::kTokens;
  constexpr int SH = log2i(TB);
  const MaskTables& t = *V.t;
  const int64_t rows = t.rows, cols = t.cols, nch = t.nchunks;
  const int64_t c0 = j * kChunkCols, c1 = std::min(c0 + span * kChunkCols, cols), w = c1 - c0;
  BigScratch& sc = big_scratch();
  sc.yt.reserve(static_cast<size_t>(span * kChunkCols * TB));
  float* YT = sc.yt.data();
  int32_t* idx = sc.idx.get(static_cast<size_t>(span * kChunkCols + 16));
  std::fill(YT, YT + w * TB, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    if constexpr (TB < kTB) {
      if (r + kMidAhead < rows) {
        const int64_t rp = r + kMidAhead;
        const char* vp = reinterpret_cast<const char*>(V.values + t.row_off[rp] + t.chunk_off[rp * nch + j]);
        _mm_prefetch(vp, _MM_HINT_T0);
        _mm_prefetch(vp + 64, _MM_HINT_T0);
        _mm_prefetch(vp + 128, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(V.mask + ((static_cast<uint64_t>(rp) * cols + c0) >> 3)), _MM_HINT_T0);
      }
    }
    if (t.row_off[r + 1] == t.row_off[r]) continue;
    const int n = row_cols<ALIGNED, SH, Ops::kWide>(V, r, c0, c1, idx);
    if (n == 0) continue;
    Ops::axpy_entries(AT + r * TB, idx, V.values + t.row_off[r] + t.chunk_off[r * nch + j], n, YT);
  }
  for (int jj = 0; jj < nt; ++jj) {
    float* y = Y + (t0 + jj) * cols + c0;
    for (int64_t i = 0; i < w; ++i) y[i] = YT[i * TB + jj];
  }
}

#if FIPS_HAVE_AVX512
// ---- AVX-512F, few tokens, byte-aligned rows (cols % 8 == 0) ----------------------------
// Same walks as the AVX2 kernels below, 16 columns per step: the 16 mask bits of the step
// are one 16-bit load, and the kept values become the dense 16 columns with one expand
// (vexpandps: entry k goes to the lane of the k-th set bit, the other lanes are zeroed). The
// loads never read past the kept entries (expand-load, or a load masked to popcount lanes:
// masked-off lanes do not fault), so no row needs the "safe" variant. When cols % 16 == 8 the
// last step covers 8 columns (8-bit mask, masked loads/stores of the activations).
inline __mmask16 bits16(const uint8_t* row, int64_t c) {
  uint16_t v;
  std::memcpy(&v, row + (c >> 3), sizeof(v));
  return static_cast<__mmask16>(v);
}

// MEM: the expand reads memory directly (fast on Intel); else masked load + register expand
// (AMD Zen 4 microcodes the memory form).
template <bool MEM>
inline __m512 expand16(const float* v, __mmask16 m) {
  if (MEM) return _mm512_maskz_expandloadu_ps(m, v);
  const __mmask16 n = static_cast<__mmask16>((1u << popcnt32(m)) - 1u);
  return _mm512_maskz_expand_ps(m, _mm512_maskz_loadu_ps(n, v));
}

// The mask bytes and the next kept value of NR consecutive (byte-aligned) rows of V from row r.
template <int NR>
struct RowCursors {
  const uint8_t* mk[NR];
  const float* v[NR];
  RowCursors(const SparseMatrix& V, int64_t r) {
    for (int i = 0; i < NR; ++i) {
      mk[i] = V.mask + ((static_cast<uint64_t>(r + i) * V.t->cols) >> 3);
      v[i] = V.values + V.t->row_off[r + i];
    }
  }
};

// transB = 0: P[tt, :] += sum over rows r in [r, r + NR) of A[tt, r] * V[r, :] for TT tokens.
template <int TT, int NR, bool MEM>
inline void nn512_block(const SparseMatrix& V, const float* A, float* P, int64_t r, const RowsPrefetch& pf) {
  const int64_t rows = V.t->rows, cols = V.t->cols, c16 = cols & ~int64_t(15);
  RowCursors<NR> rc(V, r);
  const uint8_t* const* mk = rc.mk;
  const float** v = rc.v;
  __m512 a[TT][NR];
  for (int i = 0; i < NR; ++i)
    for (int tt = 0; tt < TT; ++tt) a[tt][i] = _mm512_set1_ps(A[tt * rows + r + i]);
  for (int64_t c = 0; c < c16; c += 16) {
    pf.at(c >> 4);
    __m512 x[NR];
    for (int i = 0; i < NR; ++i) {
      const __mmask16 m = bits16(mk[i], c);
      x[i] = expand16<MEM>(v[i], m);
      v[i] += popcnt32(m);
    }
    for (int tt = 0; tt < TT; ++tt) {
      float* y = P + tt * cols + c;
      __m512 acc = _mm512_fmadd_ps(a[tt][0], x[0], _mm512_loadu_ps(y));
      for (int i = 1; i < NR; ++i) acc = _mm512_fmadd_ps(a[tt][i], x[i], acc);
      _mm512_storeu_ps(y, acc);
    }
  }
  if (c16 < cols) {  // the last 8 columns
    __m512 x[NR];
    for (int i = 0; i < NR; ++i) x[i] = expand16<MEM>(v[i], static_cast<__mmask16>(mk[i][c16 >> 3]));
    for (int tt = 0; tt < TT; ++tt) {
      float* y = P + tt * cols + c16;
      __m512 acc = _mm512_fmadd_ps(a[tt][0], x[0], _mm512_maskz_loadu_ps(0xFF, y));
      for (int i = 1; i < NR; ++i) acc = _mm512_fmadd_ps(a[tt][i], x[i], acc);
      _mm512_mask_storeu_ps(y, 0xFF, acc);
    }
  }
}

template <int TT, bool MEM>
void nn512_rows(const SparseMatrix& V, const float* A, float* P, int64_t r0, int64_t r1) {
  const MaskTables& t = *V.t;
  const int64_t steps = std::max<int64_t>(1, t.cols >> 4);
  std::fill(P, P + TT * t.cols, 0.0f);
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    if (t.row_off[r + 4] == t.row_off[r]) continue;  // four pruned-away rows
    nn512_block<TT, 4, MEM>(V, A, P, r, RowsPrefetch(V, r + 4, std::min(r + 8, r1), steps));
  }
  for (; r < r1; ++r)
    if (t.row_off[r + 1] != t.row_off[r]) nn512_block<TT, 1, MEM>(V, A, P, r, RowsPrefetch(V, r + 1, r + 2, steps));
}

// transB = 1: Y[tt, r + i] = V[r + i, :] . A[tt, :] for NR rows and TB tokens.
template <int TB, int NR, bool MEM>
inline void nt512_block(const SparseMatrix& V, const float* A, float* Y, int64_t r, const RowsPrefetch& pf) {
  const int64_t rows = V.t->rows, cols = V.t->cols, c16 = cols & ~int64_t(15);
  RowCursors<NR> rc(V, r);
  const uint8_t* const* mk = rc.mk;
  const float** v = rc.v;
  __m512 acc[NR][TB];
  for (int i = 0; i < NR; ++i)
    for (int tt = 0; tt < TB; ++tt) acc[i][tt] = _mm512_setzero_ps();
  for (int64_t c = 0; c < c16; c += 16) {
    pf.at(c >> 4);
    __m512 a[TB];
    for (int tt = 0; tt < TB; ++tt) a[tt] = _mm512_loadu_ps(A + tt * cols + c);
    for (int i = 0; i < NR; ++i) {
      const __mmask16 m = bits16(mk[i], c);
      const __m512 x = expand16<MEM>(v[i], m);
      v[i] += popcnt32(m);
      for (int tt = 0; tt < TB; ++tt) acc[i][tt] = _mm512_fmadd_ps(x, a[tt], acc[i][tt]);
    }
  }
  if (c16 < cols) {
    __m512 a[TB];
    for (int tt = 0; tt < TB; ++tt) a[tt] = _mm512_maskz_loadu_ps(0xFF, A + tt * cols + c16);
    for (int i = 0; i < NR; ++i) {
      const __m512 x = expand16<MEM>(v[i], static_cast<__mmask16>(mk[i][c16 >> 3]));
      for (int tt = 0; tt < TB; ++tt) acc[i][tt] = _mm512_fmadd_ps(x, a[tt], acc[i][tt]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int tt = 0; tt < TB; ++tt) Y[tt * rows + r + i] = _mm512_reduce_add_ps(acc[i][tt]);
}

template <int TB, bool MEM>
void nt512_rows(const SparseMatrix& V, const float* A, float* Y, int64_t r0, int64_t r1) {
  const MaskTables& t = *V.t;
  const int64_t rows = t.rows, steps = std::max<int64_t>(1, t.cols >> 4);
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    if (t.row_off[r + 4] == t.row_off[r]) {  // four pruned-away rows: outputs 0
      for (int tt = 0; tt < TB; ++tt) std::fill(Y + tt * rows + r, Y + tt * rows + r + 4, 0.0f);
      continue;
    }
    nt512_block<TB, 4, MEM>(V, A, Y, r, RowsPrefetch(V, r + 4, std::min(r + 8, r1), steps));
  }
  for (; r < r1; ++r) nt512_block<TB, 1, MEM>(V, A, Y, r, RowsPrefetch(V, r + 1, r + 2, steps));
}

// Intel: expand straight from memory; others (AMD): masked load + register expand.
// FIPS_SPARSE_EXPAND=register forces the second form (tests run both on any AVX-512 machine).
bool expand_from_memory() {
  static const bool mem = [] {
    const char* e = std::getenv("FIPS_SPARSE_EXPAND");
    if (e && std::strcmp(e, "register") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return mem;
}

// ---- AVX-512F, entry-list kernels: the inner loops of nt_big_task / nn_big_task with 16 lanes -----
// The tokens of an entry are TB / 16 zmm vectors instead of TB / 8 ymm: half the loads, FMAs and
// (transB = 0) stores per kept entry. 4 accumulator sets for 32 tokens, 8 for 16.
struct Zmm {
  using type = __m512;
  static constexpr int W = 16;
  static inline type load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, type x) { _mm512_storeu_ps(p, x); }
  static inline type zero() { return _mm512_setzero_ps(); }
  static inline type bcast(const float* p) { return _mm512_set1_ps(*p); }
  static inline type fma(type a, type b, type c) { return _mm512_fmadd_ps(a, b, c); }
  static inline type add(type a, type b) { return _mm512_add_ps(a, b); }
};

template <int TB>
struct Avx512OpsT : EntryLoops<Zmm, TB / 16, (TB >= 32 ? 4 : 8)> {
  static_assert(TB % 16 == 0, "token blocks of 16 or 32");
  static constexpr int kTokens = TB;
  static constexpr bool kWide = true;
};
using Avx512Ops = Avx512OpsT<kTB>;
#endif  // FIPS_HAVE_AVX512

// ---- transB = 0, few tokens: walk the rows of V, y += a * x ------------------------------
// Each row r adds A[t, r] * V[r, :] to the TT output rows (TT <= 8 rows of `cols` floats,
// L1/L2 resident); x is one expanded group, reused for the TT tokens.
template <int TT, bool ALIGNED, bool SAFE>
inline void nn_row(const uint8_t* mask, size_t nbytes, uint64_t base, const float* v,
                   const __m256* a, float* Y, int64_t ldy, int64_t c0, int64_t cfull, int ntail) {
  const RowBits<ALIGNED> bits(mask, nbytes, base);
  for (int64_t c = c0; c < cfull; c += 8) {
    const unsigned m = bits(c);
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

// Four byte-aligned rows at a time (full groups, rows < fast_rows): one load/store of y per
// group for four expanded groups instead of one, y += a0*x0 + a1*x1 + a2*x2 + a3*x3 (summed
// in row order).
template <int TT>
inline void nn_row4(const uint8_t* mask, uint64_t base, uint64_t row_bits, const float* v0,
                    const float* v1, const float* v2, const float* v3, const __m256 (*a)[4], float* Y,
                    int64_t ldy, int64_t c0, int64_t cfull, const RowsPrefetch& pf) {
  const uint8_t* mk0 = mask + (base >> 3);
  const uint8_t* mk1 = mask + ((base + row_bits) >> 3);
  const uint8_t* mk2 = mask + ((base + 2 * row_bits) >> 3);
  const uint8_t* mk3 = mask + ((base + 3 * row_bits) >> 3);
  for (int64_t c = c0; c < cfull; c += 8) {
    const int64_t b = c >> 3;
    pf.at(b);
    const unsigned m0 = mk0[b], m1 = mk1[b], m2 = mk2[b], m3 = mk3[b];
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
  if constexpr (ALIGNED) {
    const int64_t r4_end = std::min(r1, t.fast_rows);
    for (; r + 4 <= r4_end; r += 4) {
      if (t.row_off[r + 4] == t.row_off[r]) continue;  // four pruned-away rows
      __m256 a[TT][4];
      for (int i = 0; i < 4; ++i)
        for (int tt = 0; tt < TT; ++tt) a[tt][i] = _mm256_set1_ps(A[tt * rows + r + i]);
      nn_row4<TT>(V.mask, static_cast<uint64_t>(r) * cols, static_cast<uint64_t>(cols),
                           V.values + t.row_off[r], V.values + t.row_off[r + 1], V.values + t.row_off[r + 2],
                           V.values + t.row_off[r + 3], a, P, cols, 0, cfull,
                           RowsPrefetch(V, r + 4, std::min(r + 8, r1), cfull >> 3));
    }
  }
  for (; r < r1; ++r) {
    if (t.row_off[r + 1] == t.row_off[r]) continue;
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

template <bool ALIGNED>
void nn_walk_dispatch(int64_t tt, const SparseMatrix& V, const float* A, float* P, int64_t r0, int64_t r1) {
#if FIPS_HAVE_AVX512
  if (ALIGNED && simd_level() >= 2) {
    if (expand_from_memory()) {
      switch (tt) {
        case 1: nn512_rows<1, true>(V, A, P, r0, r1); return;
        case 2: nn512_rows<2, true>(V, A, P, r0, r1); return;
        case 3: nn512_rows<3, true>(V, A, P, r0, r1); return;
        case 4: nn512_rows<4, true>(V, A, P, r0, r1); return;
        default: break;
      }
    } else {
      switch (tt) {
        case 1: nn512_rows<1, false>(V, A, P, r0, r1); return;
        case 2: nn512_rows<2, false>(V, A, P, r0, r1); return;
        case 3: nn512_rows<3, false>(V, A, P, r0, r1); return;
        case 4: nn512_rows<4, false>(V, A, P, r0, r1); return;
        default: break;
      }
    }
  }
#endif
  switch (tt) {
    case 1: nn_small_rows<1, ALIGNED>(V, A, P, r0, r1); break;
    case 2: nn_small_rows<2, ALIGNED>(V, A, P, r0, r1); break;
    case 3: nn_small_rows<3, ALIGNED>(V, A, P, r0, r1); break;
    case 4: nn_small_rows<4, ALIGNED>(V, A, P, r0, r1); break;
    case 5: nn_small_rows<5, ALIGNED>(V, A, P, r0, r1); break;
    case 6: nn_small_rows<6, ALIGNED>(V, A, P, r0, r1); break;
    case 7: nn_small_rows<7, ALIGNED>(V, A, P, r0, r1); break;
    default: nn_small_rows<8, ALIGNED>(V, A, P, r0, r1); break;
  }
}

// Multi-row, transB = 0: one block of TB >= T tokens, A^T [rows, TB]; one task per kMidSpan column
// chunks (256 columns: the 16 KiB output tile stays in L1, V is read 256 columns of a row at a time;
// measured 10-20% faster than 128, and 6 tasks for SmolLM2's 1536 columns split evenly on 2 threads).
constexpr int64_t kMidSpan = 2;
template <bool ALIGNED, class Ops>
void nn_mid(const SparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
  const int64_t rows = V.t->rows, nch = V.t->nchunks;
  const int64_t span = kMidSpan;
  AlignedFloats at;
  transpose_all(A, T, rows, runner, at, Ops::kTokens);
  run_tasks(runner, static_cast<size_t>(ceil_div(nch, span)), [&](size_t j) {
    nn_big_task<ALIGNED, Ops>(V, at.data(), Y, static_cast<int64_t>(j) * span, 0, static_cast<int>(T), span);
  });
}

// Multi-row, transB = 1: one block of TB >= T tokens, A^T [cols, TB]; rows split by kept entries
// into a fixed number of tasks, each row done in one pass over its columns.
template <bool ALIGNED, class Ops>
void nt_mid(const SparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
  const int64_t rows = V.t->rows, cols = V.t->cols;
  const int64_t nrc = std::max<int64_t>(1, std::min<int64_t>(16, rows / 16));
  const std::vector<int64_t> bound = balanced_rows(*V.t, nrc, 8);
  AlignedFloats at;
  transpose_all(A, T, cols, runner, at, Ops::kTokens);
  run_tasks(runner, static_cast<size_t>(nrc), [&](size_t i) {
    if (bound[i] == bound[i + 1]) return;
    nt_big_task<ALIGNED, Ops>(V, at.data(), Y, bound[i], bound[i + 1], 0, static_cast<int>(T), cols);
  });
}

inline bool use_mid(int64_t T) { return T >= kMidMinT && T <= kMidMaxT && multirow_enabled(); }

template <bool ALIGNED>
void nn_avx2(const SparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
  const int64_t rows = V.t->rows, cols = V.t->cols, nch = V.t->nchunks;
  if (use_mid(T)) {
#if FIPS_HAVE_AVX512
    if (simd_level() >= 2) return nn_mid<ALIGNED, Avx512OpsT<16>>(V, A, T, Y, runner);
#endif
    return nn_mid<ALIGNED, Avx2OpsT<16>>(V, A, T, Y, runner);
  }
  if (T <= kWalkT) {
    // Split the rows of V (the reduction dimension) into nsplit slices, each summed into its
    // own partial output, then add the partials in slice order: sequential streaming of
    // values/mask, and the result does not depend on which thread ran which slice.
    const int64_t nsplit = nn_row_splits(rows);
    const std::vector<int64_t> bound = balanced_rows(*V.t, nsplit, 4);
    std::vector<float> partial(static_cast<size_t>((nsplit - 1) * T * cols));
    run_tasks(runner, static_cast<size_t>(nsplit), [&](size_t i) {
      const int64_t r0 = bound[i], r1 = bound[i + 1];
      float* P = i == 0 ? Y : partial.data() + (i - 1) * T * cols;
      nn_walk_dispatch<ALIGNED>(T, V, A, P, r0, r1);
    });
    add_partials(Y, partial.data(), nsplit - 1, T * cols);
  } else if (T < kBigTnn) {
    // One task per block of kWalkT tokens, each walking all rows of V.
    run_tasks(runner, static_cast<size_t>(ceil_div(T, kWalkT)), [&](size_t b) {
      const int64_t t0 = static_cast<int64_t>(b) * kWalkT;
      nn_walk_dispatch<ALIGNED>(std::min(kWalkT, T - t0), V, A + t0 * rows, Y + t0 * cols, 0, rows);
    });
  } else {
    const int64_t nblk = ceil_div(T, kTB);
    AlignedFloats at;
    transpose_all(A, T, rows, runner, at);
    run_tasks(runner, static_cast<size_t>(nch * nblk), [&](size_t task) {
      const int64_t j = static_cast<int64_t>(task) % nch, b = static_cast<int64_t>(task) / nch;
      const int nt = static_cast<int>(std::min<int64_t>(kTB, T - b * kTB));
      const float* atb = at.data() + b * rows * kTB;
#if FIPS_HAVE_AVX512
      if (simd_level() >= 2) return nn_big_task<ALIGNED, Avx512Ops>(V, atb, Y, j, b * kTB, nt);
#endif
      nn_big_task<ALIGNED, Avx2Ops>(V, atb, Y, j, b * kTB, nt);
    });
  }
}

// ---- transB = 1: dot products of rows of V with TB token rows of A --------------------
// U independent accumulator sets (U groups per iteration) hide the FMA latency when TB is
// small.
template <int TB, int U, bool ALIGNED, bool SAFE>
inline void nt_row(const uint8_t* mask, size_t nbytes, uint64_t base, const float* v,
                   const float* A, int64_t cols, float* out, int64_t ldy, const RowsPrefetch& pf) {
  __m256 acc[U][TB];
  for (int u = 0; u < U; ++u)
    for (int tt = 0; tt < TB; ++tt) acc[u][tt] = _mm256_setzero_ps();
  const int64_t cfull = cols & ~int64_t(7);
  const RowBits<ALIGNED> bits(mask, nbytes, base);
  int64_t c = 0;
  for (; c + 8 * U <= cfull; c += 8 * U) {
    pf.at(c / (8 * U));
    for (int u = 0; u < U; ++u) {
      const unsigned m = bits(c + 8 * u);
      const __m256 x = expand8(load_vals<SAFE>(v, m), m);
      v += popcnt32(m);
      for (int tt = 0; tt < TB; ++tt)
        acc[u][tt] = _mm256_fmadd_ps(x, _mm256_loadu_ps(A + tt * cols + c + 8 * u), acc[u][tt]);
    }
  }
  for (; c < cfull; c += 8) {
    const unsigned m = bits(c);
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

constexpr int kNTTile = 4;  // tokens per register block (transB = 1, T < kBigTnt)

template <int TB, bool ALIGNED>
void nt_rows(const SparseMatrix& V, const float* A, float* Y, int64_t r0, int64_t r1) {
#if FIPS_HAVE_AVX512
  if (ALIGNED && simd_level() >= 2) {
    if (expand_from_memory()) nt512_rows<TB, true>(V, A, Y, r0, r1);
    else nt512_rows<TB, false>(V, A, Y, r0, r1);
    return;
  }
#endif
  constexpr int U = TB == 1 ? 4 : (TB == 2 ? 2 : 1);
  const MaskTables& t = *V.t;
  const int64_t rows = t.rows, cols = t.cols;
  for (int64_t r = r0; r < r1; ++r) {
    if (t.row_off[r + 1] == t.row_off[r]) {  // a pruned-away row: its outputs are 0
      for (int tt = 0; tt < TB; ++tt) Y[tt * rows + r] = 0.0f;
      continue;
    }
    const float* v = V.values + t.row_off[r];
    const uint64_t base = static_cast<uint64_t>(r) * cols;
    const RowsPrefetch pf(V, r + 1, std::min(r + 2, r1), (cols & ~int64_t(7)) / (8 * U));
    if (r < t.fast_rows)
      nt_row<TB, U, ALIGNED, false>(V.mask, V.mask_bytes, base, v, A, cols, Y + r, rows, pf);
    else
      nt_row<TB, U, ALIGNED, true>(V.mask, V.mask_bytes, base, v, A, cols, Y + r, rows, pf);
  }
}

template <bool ALIGNED>
void nt_avx2(const SparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
  const int64_t rows = V.t->rows, cols = V.t->cols;
  if (use_mid(T)) {
#if FIPS_HAVE_AVX512
    if (simd_level() >= 2) return nt_mid<ALIGNED, Avx512OpsT<16>>(V, A, T, Y, runner);
#endif
    return nt_mid<ALIGNED, Avx2OpsT<16>>(V, A, T, Y, runner);
  }
  if (T >= kBigTnt) {
    const int64_t rcb = 256;  // rows per task: the transposed token block is reused for them
    const int64_t nrc = ceil_div(rows, rcb), nblk = ceil_div(T, kTB);
    const std::vector<int64_t> bound = balanced_rows(*V.t, nrc, 8);
    AlignedFloats at;
    transpose_all(A, T, cols, runner, at);
    run_tasks(runner, static_cast<size_t>(nrc * nblk), [&](size_t task) {
      const int64_t i = static_cast<int64_t>(task) % nrc, b = static_cast<int64_t>(task) / nrc;
      if (bound[i] == bound[i + 1]) return;
      const int nt = static_cast<int>(std::min<int64_t>(kTB, T - b * kTB));
      const float* atb = at.data() + b * cols * kTB;
#if FIPS_HAVE_AVX512
      if (simd_level() >= 2) return nt_big_task<ALIGNED, Avx512Ops>(V, atb, Y, bound[i], bound[i + 1], b * kTB, nt);
#endif
      nt_big_task<ALIGNED, Avx2Ops>(V, atb, Y, bound[i], bound[i + 1], b * kTB, nt);
    });
    return;
  }
  const int64_t rc = nt_row_chunk(rows);
  const int64_t nrc = ceil_div(rows, rc), ntok = ceil_div(T, kTokenChunk);
  const std::vector<int64_t> bound = balanced_rows(*V.t, nrc, 1);
  run_tasks(runner, static_cast<size_t>(nrc * ntok), [&](size_t task) {
    const int64_t i = static_cast<int64_t>(task) % nrc, tk = static_cast<int64_t>(task) / nrc;
    const int64_t r0 = bound[i], r1 = bound[i + 1];
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

void spmm_nn(const SparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
  if (T <= 0 || V.t->cols == 0) return;
#if FIPS_HAVE_AVX2
  if (V.t->cols % 8 == 0) nn_avx2<true>(V, A, T, Y, runner);
  else nn_avx2<false>(V, A, T, Y, runner);
#else
  nn_scalar(V, A, T, Y, runner);
#endif
}

void spmm_nt(const SparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
  if (T <= 0 || V.t->rows == 0) return;
#if FIPS_HAVE_AVX2
  if (V.t->cols % 8 == 0) nt_avx2<true>(V, A, T, Y, runner);
  else nt_avx2<false>(V, A, T, Y, runner);
#else
  nt_scalar(V, A, T, Y, runner);
#endif
}

}  // namespace FIPS_LEVEL_NS
}  // namespace fips
