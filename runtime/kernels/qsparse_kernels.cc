// fips.QSparseMatMul products straight from codes + scales + packed bitmask (see qsparse_kernels.h).
//
// Compiled once per kernel level, like sparse_kernels.cc (runtime/kernel_build.py): -DFIPS_KERNEL_LEVEL
// = 0 (portable: scalar loops), 1 (AVX2 + FMA: 8-column mask steps, table-permute expand), 2 (AVX-512F:
// 16-column steps, vexpandps from a register; the AVX2 loops where rows are not byte-aligned).
// Everything is in the level's namespace and nothing runs at load (constexpr tables only).
//
// Decoding a mask step of the few-token kernels (n = popcount of the step's mask bits m, k = index
// of the row's next kept entry):
//   int8: load the next 16 (8) code bytes at codes + k, sign-extend to int32, convert to float
//   int4: the 64 (32) bits from nibble k on (a 128-bit (64-bit) load at byte k >> 1 shifted by
//         4 * (k & 1)), one 32-bit lane per nibble (variable shift + and), sign: (x ^ 8) - 8
//   grouped scales (g > 0): lane i of the packed codes gets scales[(k + i) / g]: for g >= the step
//         width a step spans at most two groups (a blend at the group boundary), else per lane
//   x = expand(codes * scales, m) (the dense columns of the step), k += n
// Loads may read past the row's kept entries (not past the array): rows whose loads could reach
// the end of the codes array copy the step's bytes into a zeroed buffer first ("safe" rows: the
// last few rows of V).
#include "qsparse_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <vector>

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
#define FIPS_HAVE_AVX512 1
#else
#define FIPS_LEVEL_NS avx2
#define FIPS_HAVE_AVX512 0
#endif
#else
#error "FIPS_KERNEL_LEVEL must be 0 (portable), 1 (avx2) or 2 (avx512)"
#endif

#define FIPS_QINLINE inline __attribute__((always_inline))

#include "mask_walk.h"  // ceil_div, bit_at, bits8, low_bits, RowBits, run_tasks, balanced_rows, add_partials

namespace fips {
namespace FIPS_LEVEL_NS {
namespace {

// Code of kept entry k and its scale (scalar; the portable level and the tails).
inline int code_at(const QSparseMatrix& Q, int64_t k) {
  if (Q.bits == 8) return static_cast<int8_t>(Q.codes[k]);
  const unsigned b = Q.codes[k >> 1];
  const int nib = static_cast<int>((k & 1) ? (b >> 4) : (b & 15u));
  return (nib ^ 8) - 8;
}
inline float scale_at(const QSparseMatrix& Q, int64_t row, int64_t k) {
  return Q.group_size == 0 ? Q.scales[row] : Q.scales[k / Q.group_size];
}

// Rows in [0, fast) may load 32 code entries (16 bytes of int8, 16 bytes of int4 from k >> 1)
// past any of their kept entries without leaving the codes array.
[[maybe_unused]] int64_t fast_rows(const QSparseMatrix& Q) {
  const MaskTables& t = *Q.t;
  int64_t fr = t.rows;
  while (fr > 0 && t.row_off[fr] + 32 > t.nnz) --fr;
  return fr;
}

// Segment-wise dequantization of kept entries [k0, k1) (constant scale per segment).
template <class Seg>
void for_segments(const QSparseMatrix& Q, int64_t k0, int64_t k1, Seg&& seg) {
  const MaskTables& t = *Q.t;
  if (k0 >= k1) return;
  if (Q.group_size == 0) {
    int64_t r = std::upper_bound(t.row_off.begin(), t.row_off.end(), k0) - t.row_off.begin() - 1;
    for (int64_t k = k0; k < k1; ++r) {
      const int64_t e = std::min(k1, t.row_off[r + 1]);
      if (e > k) seg(k, e, Q.scales[r]);
      k = std::max(k, e);
    }
  } else {
    const int64_t g = Q.group_size;
    for (int64_t k = k0; k < k1;) {
      const int64_t e = std::min(k1, (k / g + 1) * g);
      seg(k, e, Q.scales[k / g]);
      k = e;
    }
  }
}

#if !FIPS_HAVE_AVX2
// ------------------------------------------------------------------------------------
// Portable scalar path (level 0).
// ------------------------------------------------------------------------------------
constexpr int64_t kTokenChunk = 64;

void qnn_scalar(const QSparseMatrix& Q, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
  const MaskTables& t = *Q.t;
  const int64_t rows = t.rows, cols = t.cols;
  // column slices of 128 (the chunk table when there is one, else a walk of the row's prefix)
  const int64_t nch = ceil_div(cols, kChunkCols), ntok = ceil_div(T, kTokenChunk);
  run_tasks(runner, static_cast<size_t>(nch * ntok), [&](size_t task) {
    const int64_t j = static_cast<int64_t>(task) % nch, tk = static_cast<int64_t>(task) / nch;
    const int64_t c0 = j * kChunkCols, c1 = std::min(c0 + kChunkCols, cols);
    const int64_t t0 = tk * kTokenChunk, t1 = std::min(t0 + kTokenChunk, T);
    for (int64_t tt = t0; tt < t1; ++tt) std::fill(Y + tt * cols + c0, Y + tt * cols + c1, 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      if (t.row_off[r + 1] == t.row_off[r]) continue;
      const uint64_t base = static_cast<uint64_t>(r) * cols;
      int64_t k = t.row_off[r];
      if (t.nchunks == nch && !t.chunk_off.empty()) {
        k += t.chunk_off[r * nch + j];
      } else {
        for (int64_t c = 0; c < c0; ++c) k += bit_at(Q.mask, base + c);
      }
      for (int64_t c = c0; c < c1; ++c) {
        if (!bit_at(Q.mask, base + c)) continue;
        const float val = static_cast<float>(code_at(Q, k)) * scale_at(Q, r, k);
        ++k;
        for (int64_t tt = t0; tt < t1; ++tt) Y[tt * cols + c] += A[tt * rows + r] * val;
      }
    }
  });
}

void qnt_scalar(const QSparseMatrix& Q, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
  const MaskTables& t = *Q.t;
  const int64_t rows = t.rows, cols = t.cols;
  const int64_t rc = std::max<int64_t>(8, std::min<int64_t>(64, ceil_div(rows, 8)));
  const int64_t nrc = ceil_div(rows, rc), ntok = ceil_div(T, kTokenChunk);
  run_tasks(runner, static_cast<size_t>(nrc * ntok), [&](size_t task) {
    const int64_t i = static_cast<int64_t>(task) % nrc, tk = static_cast<int64_t>(task) / nrc;
    const int64_t r0 = i * rc, r1 = std::min(r0 + rc, rows);
    const int64_t t0 = tk * kTokenChunk, t1 = std::min(t0 + kTokenChunk, T);
    for (int64_t tt = t0; tt < t1; ++tt) {
      const float* a = A + tt * cols;
      for (int64_t r = r0; r < r1; ++r) {
        int64_t k = t.row_off[r];
        const uint64_t base = static_cast<uint64_t>(r) * cols;
        float s = 0.0f;
        for (int64_t c = 0; c < cols; ++c)
          if (bit_at(Q.mask, base + c)) {
            s += static_cast<float>(code_at(Q, k)) * scale_at(Q, r, k) * a[c];
            ++k;
          }
        Y[tt * rows + r] = s;
      }
    }
  });
}

void dequant_range(const QSparseMatrix& Q, int64_t k0, int64_t k1, float* out) {
  for_segments(Q, k0, k1, [&](int64_t a, int64_t b, float s) {
    for (int64_t k = a; k < b; ++k) out[k] = static_cast<float>(code_at(Q, k)) * s;
  });
}
#endif  // !FIPS_HAVE_AVX2

#if FIPS_HAVE_AVX2
// ------------------------------------------------------------------------------------
// AVX2 + FMA (8-column steps); also the unaligned-row path of the AVX-512 level.
// ------------------------------------------------------------------------------------
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
constexpr ExpandLut g_qlut{};

FIPS_QINLINE __m256i lanes_lt8(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

FIPS_QINLINE __m256 expand8(__m256 raw, unsigned m) {
  const __m256i idx = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(g_qlut.idx[m])));
  const __m256 p = _mm256_permutevar8x32_ps(raw, idx);
  return _mm256_blendv_ps(_mm256_setzero_ps(), p, _mm256_castsi256_ps(idx));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The bytes a step of n codes from entry k reads, copied into a zeroed 16-byte buffer (safe rows).
FIPS_QINLINE const uint8_t* safe_copy(const QSparseMatrix& Q, int64_t k, int n, uint8_t* buf) {
  std::memset(buf, 0, 32);
  if (n <= 0) return buf;
  if (Q.bits == 8) {
    std::memcpy(buf, Q.codes + k, static_cast<size_t>(n));
  } else {
    const int64_t b0 = k >> 1, b1 = (k + n - 1) >> 1;
    std::memcpy(buf, Q.codes + b0, static_cast<size_t>(b1 - b0 + 1));
  }
  return buf;
}

// 8 codes from entry k as floats (lanes >= n: whatever the bytes hold; expand drops them).
template <int BITS, bool SAFE>
FIPS_QINLINE __m256 codes8(const QSparseMatrix& Q, int64_t k, int n) {
  alignas(32) uint8_t buf[32];
  if (BITS == 8) {
    const uint8_t* p = SAFE ? safe_copy(Q, k, n, buf) : Q.codes + k;
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  } else {
    const uint8_t* p = SAFE ? safe_copy(Q, k, n, buf) : Q.codes + (k >> 1);
    uint64_t w;
    std::memcpy(&w, p, sizeof(w));
    const uint32_t q = static_cast<uint32_t>(w >> ((k & 1) * 4));
    const __m256i v = _mm256_sllv_epi32(_mm256_set1_epi32(static_cast<int>(q)), _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0));
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 28));
  }
}

// Group-scale cursor of one row (g > 0): group index gi and position gr inside it of entry k.
struct GroupCursor {
  int64_t gi = 0, gr = 0;
  void start(int64_t k, int64_t g) {
    gi = k / g;
    gr = k - gi * g;
  }
  // a step of n <= W entries; g >= W: at most one group boundary (branch-free), else divide
  template <int W>
  FIPS_QINLINE void advance(int n, int64_t g) {
    gr += n;
    if (g >= W) {
      const int64_t over = gr >= g;
      gr -= over * g;
      gi += over;
    } else if (gr >= g) {
      gi += gr / g;
      gr %= g;
    }
  }
};

// Scales of the 8 packed lanes of a step from entry k (lanes >= n arbitrary but in range).
FIPS_QINLINE __m256 scales8(const QSparseMatrix& Q, const GroupCursor& gc, int64_t k, int n) {
  const int64_t g = Q.group_size;
  if (g >= 8) {
    const __m256 s0 = _mm256_set1_ps(Q.scales[gc.gi]);
    const __m256 s1 = _mm256_set1_ps(Q.scales[std::min(gc.gi + 1, Q.nscales - 1)]);
    const __m256i ge = _mm256_cmpgt_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                          _mm256_set1_epi32(static_cast<int>(g - gc.gr) - 1));
    return _mm256_blendv_ps(s0, s1, _mm256_castsi256_ps(ge));
  }
  alignas(32) float s[8];
  for (int i = 0; i < 8; ++i) s[i] = Q.scales[std::min((k + std::min(i, std::max(n - 1, 0))) / g, Q.nscales - 1)];
  return _mm256_load_ps(s);
}

// transB = 0, one row r of V into TT output rows of P: P[tt, :] += a[tt] * V[r, :].
template <int BITS, int TT, bool GROUPED, bool ALIGNED, bool SAFE>
void qnn8_row(const QSparseMatrix& Q, const float* A, float* P, int64_t r) {
  const MaskTables& t = *Q.t;
  const int64_t rows = t.rows, cols = t.cols, cfull = cols & ~int64_t(7);
  const int ntail = static_cast<int>(cols - cfull);
  const uint64_t base = static_cast<uint64_t>(r) * cols;
  const RowBits<ALIGNED> bits(Q.mask, Q.mask_bytes, base);
  int64_t k = t.row_off[r];
  GroupCursor gc;
  if (GROUPED) gc.start(k, Q.group_size);
  const float rs = GROUPED ? 1.0f : Q.scales[r];
  __m256 a[TT];
  #pragma GCC unroll 16
  for (int tt = 0; tt < TT; ++tt) a[tt] = _mm256_set1_ps(A[tt * rows + r] * rs);
  for (int64_t c = 0; c < cfull; c += 8) {
    const unsigned m = bits(c);
    const int n = __builtin_popcount(m);
    __m256 raw = codes8<BITS, SAFE>(Q, k, n);
    if (GROUPED) {
      raw = _mm256_mul_ps(raw, scales8(Q, gc, k, n));
      gc.advance<8>(n, Q.group_size);
    }
    k += n;
    const __m256 x = expand8(raw, m);
    #pragma GCC unroll 16
    for (int tt = 0; tt < TT; ++tt) {
      float* y = P + tt * cols + c;
      _mm256_storeu_ps(y, _mm256_fmadd_ps(a[tt], x, _mm256_loadu_ps(y)));
    }
  }
  if (ntail) {
    const unsigned m = bits8(Q.mask, Q.mask_bytes, base + cfull) & low_bits(ntail);
    const int n = __builtin_popcount(m);
    __m256 raw = codes8<BITS, true>(Q, k, n);
    if (GROUPED) raw = _mm256_mul_ps(raw, scales8(Q, gc, k, n));
    const __m256 x = expand8(raw, m);
    const __m256i lanes = lanes_lt8(ntail);
    #pragma GCC unroll 16
    for (int tt = 0; tt < TT; ++tt) {
      float* y = P + tt * cols + cfull;
      _mm256_maskstore_ps(y, lanes, _mm256_fmadd_ps(a[tt], x, _mm256_maskload_ps(y, lanes)));
    }
  }
}

// transB = 1, one row r of V with TB token rows of A: Y[tt, r] = V[r, :] . A[tt, :].
template <int BITS, int TB, bool GROUPED, bool ALIGNED, bool SAFE>
void qnt8_row(const QSparseMatrix& Q, const float* A, float* Y, int64_t r) {
  const MaskTables& t = *Q.t;
  const int64_t rows = t.rows, cols = t.cols, cfull = cols & ~int64_t(7);
  const uint64_t base = static_cast<uint64_t>(r) * cols;
  const RowBits<ALIGNED> bits(Q.mask, Q.mask_bytes, base);
  int64_t k = t.row_off[r];
  GroupCursor gc;
  if (GROUPED) gc.start(k, Q.group_size);
  __m256 acc[TB];
  #pragma GCC unroll 16
  for (int tt = 0; tt < TB; ++tt) acc[tt] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c < cfull; c += 8) {
    const unsigned m = bits(c);
    const int n = __builtin_popcount(m);
    __m256 raw = codes8<BITS, SAFE>(Q, k, n);
    if (GROUPED) {
      raw = _mm256_mul_ps(raw, scales8(Q, gc, k, n));
      gc.advance<8>(n, Q.group_size);
    }
    k += n;
    const __m256 x = expand8(raw, m);
    #pragma GCC unroll 16
    for (int tt = 0; tt < TB; ++tt) acc[tt] = _mm256_fmadd_ps(x, _mm256_loadu_ps(A + tt * cols + c), acc[tt]);
  }
  if (c < cols) {
    const int nt = static_cast<int>(cols - c);
    const unsigned m = bits8(Q.mask, Q.mask_bytes, base + c) & low_bits(nt);
    const int n = __builtin_popcount(m);
    __m256 raw = codes8<BITS, true>(Q, k, n);
    if (GROUPED) raw = _mm256_mul_ps(raw, scales8(Q, gc, k, n));
    const __m256 x = expand8(raw, m);
    const __m256i lanes = lanes_lt8(nt);
    #pragma GCC unroll 16
    for (int tt = 0; tt < TB; ++tt) acc[tt] = _mm256_fmadd_ps(x, _mm256_maskload_ps(A + tt * cols + c, lanes), acc[tt]);
  }
  const float rs = GROUPED ? 1.0f : Q.scales[r];
  #pragma GCC unroll 16
  for (int tt = 0; tt < TB; ++tt) Y[tt * rows + r] = hsum8(acc[tt]) * rs;
}

// ---- shared by the quantized-activation kernels (AVX2 below, AVX-512 VNNI further down) ----------------
// The run-time gates of the optional AVX-512 kernels (VBMI2 here, VNNI below): an opt-out variable set to
// anything but "" or "0", or a feature FIPS_SPARSE_TEST_CPU_LACKS names (tests), turns a kernel off.
bool env_opt_out(const char* name) {
  const char* e = std::getenv(name);
  return e && e[0] && std::strcmp(e, "0") != 0;
}
bool test_cpu_lacks(const char* feature) {
  const char* lacks = std::getenv("FIPS_SPARSE_TEST_CPU_LACKS");
  return lacks && std::strstr(lacks, feature);
}

constexpr int64_t kActBlock = 64;  // entries of the reduction axis per activation scale

// 64-byte aligned scratch (a few KiB per call).
template <class T>
struct Scratch {
  std::unique_ptr<T[], void (*)(T*)> p{nullptr, [](T* x) { ::operator delete[](x, std::align_val_t(64)); }};
  explicit Scratch(size_t n) {
    p.reset(static_cast<T*>(::operator new[](std::max<size_t>(n, 1) * sizeof(T), std::align_val_t(64))));
    std::memset(p.get(), 0, std::max<size_t>(n, 1) * sizeof(T));
  }
  T* get() const { return p.get(); }
};

// transB = 1: the activation rows quantized per kActBlockNT columns (the last block 64 wide when
// cols % 128 == 64): one int32 -> float conversion per two 64-column steps.
constexpr int64_t kActBlockNT = 128;
// Work per task of the quantized-activation kernels: at least this many 64-column steps (below it the
// thread hand-off costs more than it saves; FIPS_QSPARSE_ACT8_TASK_STEPS overrides, for measurements).
int64_t act8_task_steps() {
  static const int64_t n = [] {
    const char* e = std::getenv("FIPS_QSPARSE_ACT8_TASK_STEPS");
    return e && e[0] ? std::max<int64_t>(1, std::strtoll(e, nullptr, 10)) : int64_t(kAct8TaskSteps);
  }();
  return n;
}

// Non-empty rows in [r0, r1).
int64_t live_rows(const MaskTables& t, int64_t r0, int64_t r1) {
  int64_t n = 0;
  for (int64_t r = r0; r < r1; ++r) n += t.row_off[r + 1] != t.row_off[r];
  return n;
}

// Tasks of a call: its steps (T x non-empty rows x cols / 64) over act8_task_steps(), in [1, cap].
int64_t act8_tasks(const MaskTables& t, int64_t T, int64_t cap) {
  const int64_t steps = T * live_rows(t, 0, t.rows) * (t.cols / 64);
  return std::max<int64_t>(1, std::min<int64_t>(cap, steps / act8_task_steps()));
}

// Row boundaries of `parts` slices with about the same number of non-empty rows (the work of the
// VNNI kernels, see kAct8TaskSteps), each boundary a multiple of `align`. Depends only on the mask.
std::vector<int64_t> live_row_bounds(const MaskTables& t, int64_t parts, int64_t align) {
  std::vector<int64_t> b(static_cast<size_t>(parts) + 1, t.rows);
  b[0] = 0;
  const int64_t live = live_rows(t, 0, t.rows);
  int64_t seen = 0, r = 0;
  for (int64_t k = 1; k < parts; ++k) {
    const int64_t target = live * k / parts;
    while (r < t.rows && seen < target) seen += t.row_off[r + 1] != t.row_off[r], ++r;
    b[k] = std::max(b[k - 1], std::min(t.rows, (r + align / 2) / align * align));
  }
  return b;
}

// ---- AVX2 quantized activations (activation_bits = 8), int8 codes with per-row scales, transB = 1 ----
// The same computation as the VNNI transB = 1 kernel below (docs/sparse-op.md), for CPUs without AVX-512
// VNNI (AVX2 only, e.g. Zen 2/3, Haswell to Comet Lake): A quantized per 128-column block to int8 (the same
// rounding and scales), each block's sum(code * xq) exact in int32, acc += float(sum) * xs[b], Y[t, r] =
// hsum(acc) * scales[r]. There is no u8 x s8 dot with 32-bit accumulation in AVX2, so per 32-column step:
//   expand: per 16 columns one 16-byte load of the row's next codes and vpshufb with a control built from
//     two 8-byte table rows (mask byte -> the code index of each kept column, 0x80 for a pruned one: 0),
//     the second byte's indices offset by the popcount of the first (its codes follow in the same load)
//   dot: vpmaddubsw(|w|, sign(xq, w)) (|w| <= 128 as u8, |xq| <= 127: a pair sums to <= 32512, no
//     saturation) then vpmaddwd by 1 into the int32 block sums; exact, so the result equals VNNI's up to
//     the float summation order of the block terms.
// Each row's code stream is prefetched kPrefetchCodesAvx2 bytes ahead, and the next row group's mask once per
// block (as in the VNNI kernels). The 16-byte loads read up to 16 bytes past a row's codes: rows whose reads
// could pass the end of the codes array run from a zero-padded copy of their codes. (A variant with a
// [9][256] table of pre-offset controls instead of the add measured the same; not kept.)
constexpr int kPrefetchCodesAvx2 = 4096;

struct ShufLut {
  alignas(64) uint64_t ctl[256] = {};
  alignas(16) uint8_t off[9][16] = {};  // [k]: 8 zero bytes then 8 bytes of k (the second byte's offset)
  constexpr ShufLut() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      uint64_t v = 0;
      for (int j = 0; j < 8; ++j) {
        const uint64_t b = ((m >> j) & 1) ? static_cast<uint64_t>(k++) : uint64_t(0x80);
        v |= b << (8 * j);
      }
      ctl[m] = v;
    }
    for (int k = 0; k <= 8; ++k)
      for (int j = 8; j < 16; ++j) off[k][j] = static_cast<uint8_t>(k);
  }
};
constexpr ShufLut g_shuf{};

// The 16 codes of columns [c, c + 16) of a row (pruned: 0) from mask bits m (16 bits); p advances.
FIPS_QINLINE __m128i expand16_i8(const uint8_t*& p, unsigned m) {
  const unsigned m0 = m & 0xff, m1 = (m >> 8) & 0xff;
  const int n0 = __builtin_popcount(m0);
  const __m128i ctl = _mm_add_epi8(
      _mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(&g_shuf.ctl[m0])),
                         _mm_loadl_epi64(reinterpret_cast<const __m128i*>(&g_shuf.ctl[m1]))),
      _mm_load_si128(reinterpret_cast<const __m128i*>(g_shuf.off[n0])));
  const __m128i w = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), ctl);
  p += n0 + __builtin_popcount(m1);
  return w;
}

// A quantized per kActBlockNT columns (the last block 64 wide when cols % 128 == 64), as ActNT below.
struct Act8NT {
  int64_t T, cols, nblk;
  Scratch<int8_t> q;  // [T][cols]
  Scratch<float> s;   // [T][nblk]
  Act8NT(const float* A, int64_t T_, int64_t cols_)
      : T(T_), cols(cols_), nblk(ceil_div(cols_, kActBlockNT)), q(static_cast<size_t>(T_ * cols_)),
        s(static_cast<size_t>(T_ * nblk)) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t b = 0; b < nblk; ++b) {
        const int64_t w = std::min(kActBlockNT, cols - b * kActBlockNT);
        const float* x = A + t * cols + b * kActBlockNT;
        __m256 mx = _mm256_setzero_ps();
        for (int64_t i = 0; i < w; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float amax = _mm_cvtss_f32(h);
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        s.get()[t * nblk + b] = amax / 127.0f;
        const __m256 iv = _mm256_set1_ps(inv);
        for (int64_t i = 0; i < w; i += 32) {
          __m256i v[4];
          for (int j = 0; j < 4; ++j) v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), iv));
          // saturating packs work per 128-bit lane: bytes come out in 4-byte groups ordered 0,2,4,6,1,3,5,7
          const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(q.get() + t * cols + b * kActBlockNT + i),
                              _mm256_permutevar8x32_epi32(p, order));
        }
      }
  }
};

// Y[t0 + tt, r + i] for TB tokens and NR rows; cp[i]: row r + i's codes (readable 16 bytes past its end).
template <int TB, int NR>
void qnt32_act8_block(const QSparseMatrix& Q, const Act8NT& X, int64_t t0, float* Y, int64_t r,
                      const uint8_t* const* cp_in) {
  const MaskTables& t = *Q.t;
  const int64_t rows = t.rows, cols = t.cols, nblk = X.nblk, rb = cols >> 3;
  const uint8_t* mk = Q.mask + ((static_cast<uint64_t>(r) * cols) >> 3);
  const uint8_t* cp[NR];
  __m256 acc[NR][TB];
  const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 16
  for (int i = 0; i < NR; ++i) {
    cp[i] = cp_in[i];
#pragma GCC unroll 16
    for (int tt = 0; tt < TB; ++tt) acc[i][tt] = _mm256_setzero_ps();
  }
  const int8_t* xq0 = X.q.get() + t0 * cols;
  const float* xs0 = X.s.get() + t0 * nblk;
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t c0 = b * kActBlockNT, c1 = std::min(cols, c0 + kActBlockNT);
    __m256i d[NR][TB];
#pragma GCC unroll 16
    for (int i = 0; i < NR; ++i)
#pragma GCC unroll 16
      for (int tt = 0; tt < TB; ++tt) d[i][tt] = _mm256_setzero_si256();
#pragma GCC unroll 16
    for (int i = 0; i < NR; ++i)
      _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(mk) +
                                                 static_cast<uintptr_t>((i + NR) * rb + (c0 >> 3))), _MM_HINT_T0);
    for (int64_t c = c0; c < c1; c += 32) {
      __m256i xa[TB];
#pragma GCC unroll 16
      for (int tt = 0; tt < TB; ++tt) xa[tt] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq0 + tt * cols + c));
#pragma GCC unroll 16
      for (int i = 0; i < NR; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(cp[i]) + kPrefetchCodesAvx2), _MM_HINT_T0);
        uint32_t m;
        std::memcpy(&m, mk + i * rb + (c >> 3), sizeof(m));
        const __m128i lo = expand16_i8(cp[i], m & 0xffff);
        const __m128i hi = expand16_i8(cp[i], m >> 16);
        const __m256i w = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
        const __m256i aw = _mm256_abs_epi8(w);
#pragma GCC unroll 16
        for (int tt = 0; tt < TB; ++tt)
          d[i][tt] = _mm256_add_epi32(
              d[i][tt], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xa[tt], w)), ones));
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < NR; ++i)
#pragma GCC unroll 16
      for (int tt = 0; tt < TB; ++tt)
        acc[i][tt] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[i][tt]), _mm256_set1_ps(xs0[tt * nblk + b]), acc[i][tt]);
  }
#pragma GCC unroll 16
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 16
    for (int tt = 0; tt < TB; ++tt) Y[(t0 + tt) * rows + r + i] = hsum8(acc[i][tt]) * Q.scales[r + i];
}

// Rows [r0, r1), TB tokens from t0; pad: cols + 16 bytes of scratch (rows near the end of the codes array).
template <int TB, int NR>
void qnt_act8_rows(const QSparseMatrix& Q, const Act8NT& X, int64_t t0, float* Y, int64_t r0, int64_t r1,
                   uint8_t* pad) {
  const MaskTables& t = *Q.t;
  const int64_t rows = t.rows, limit = Q.code_bytes - 16;  // a row ending at or before `limit` reads inside
  auto zero_rows = [&](int64_t a, int64_t b) {
    for (int tt = 0; tt < TB; ++tt) std::fill(Y + (t0 + tt) * rows + a, Y + (t0 + tt) * rows + b, 0.0f);
  };
  int64_t r = r0;
  for (; r + NR <= r1 && t.row_off[r + NR] <= limit; r += NR) {
    if (t.row_off[r + NR] == t.row_off[r]) {
      zero_rows(r, r + NR);
      continue;
    }
    const uint8_t* cp[NR];
    for (int i = 0; i < NR; ++i) cp[i] = Q.codes + t.row_off[r + i];
    qnt32_act8_block<TB, NR>(Q, X, t0, Y, r, cp);
  }
  for (; r < r1; ++r) {
    const int64_t k0 = t.row_off[r], k1 = t.row_off[r + 1];
    if (k1 == k0) {
      zero_rows(r, r + 1);
      continue;
    }
    const uint8_t* p = Q.codes + k0;
    if (k1 > limit) {  // a zero-padded copy (k1 - k0 <= cols)
      std::memcpy(pad, p, static_cast<size_t>(k1 - k0));
      std::memset(pad + (k1 - k0), 0, 16);
      p = pad;
    }
    qnt32_act8_block<TB, 1>(Q, X, t0, Y, r, &p);
  }
}

void qnt_act8_avx2(const QSparseMatrix& Q, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
  const MaskTables& t = *Q.t;
  const Act8NT X(A, T, t.cols);
  const int64_t ntask = std::min<int64_t>(ceil_div(t.rows, 32), act8_tasks(t, T, 16));
  const std::vector<int64_t> bound = live_row_bounds(t, ntask, 4);
  run_tasks(runner, static_cast<size_t>(ntask), [&](size_t i) {
    Scratch<uint8_t> pad(static_cast<size_t>(t.cols + 16));
    for (int64_t t0 = 0; t0 < T; t0 += 4) {
      const int64_t r0 = bound[i], r1 = bound[i + 1];
      switch (std::min<int64_t>(4, T - t0)) {
        case 1: qnt_act8_rows<1, 4>(Q, X, t0, Y, r0, r1, pad.get()); break;
        case 2: qnt_act8_rows<2, 2>(Q, X, t0, Y, r0, r1, pad.get()); break;
        case 3: qnt_act8_rows<3, 1>(Q, X, t0, Y, r0, r1, pad.get()); break;
        default: qnt_act8_rows<4, 1>(Q, X, t0, Y, r0, r1, pad.get()); break;
      }
    }
  });
}

// The codes and layout the quantized-activation kernels take (int8 per-row codes, cols % 64 == 0), on a
// node with activation_bits = 8; FIPS_QSPARSE_NO_ACT8=1 turns every quantized-activation kernel off.
bool act8_layout(const QSparseMatrix& Q) {
  static const bool off = env_opt_out("FIPS_QSPARSE_NO_ACT8");
  return !off && Q.act_bits == 8 && Q.bits == 8 && Q.group_size == 0 && Q.t->cols % kActBlock == 0;
}

#if FIPS_HAVE_AVX512
// ------------------------------------------------------------------------------------
// AVX-512F (16-column steps, rows byte-aligned: cols % 8 == 0).
// ------------------------------------------------------------------------------------
FIPS_QINLINE __mmask16 bits16(const uint8_t* row, int64_t c) {
  uint16_t v;
  std::memcpy(&v, row + (c >> 3), sizeof(v));
  return static_cast<__mmask16>(v);
}

template <int BITS, bool SAFE>
FIPS_QINLINE __m512 codes16(const QSparseMatrix& Q, int64_t k, int n) {
  alignas(32) uint8_t buf[32];
  if (BITS == 8) {
    const uint8_t* p = SAFE ? safe_copy(Q, k, n, buf) : Q.codes + k;
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  } else {
    const uint8_t* p = SAFE ? safe_copy(Q, k, n, buf) : Q.codes + (k >> 1);
    uint64_t w0, w1;
    std::memcpy(&w0, p, 8);
    std::memcpy(&w1, p + 8, 8);
    const unsigned sh = static_cast<unsigned>(k & 1) * 4;
    // 64 bits from nibble k: w0 >> sh with the low nibble of w1 on top when sh == 4
    const uint64_t q = (w0 >> sh) | ((w1 << (63 - sh)) << 1);
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(static_cast<int>(q))),
                                            _mm256_set1_epi32(static_cast<int>(q >> 32)), 1);
    // nibble j of each half to the top of lane j, then an arithmetic shift: the sign-extended code
    const __m512i sv = _mm512_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
    return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_sllv_epi32(both, sv), 28));
  }
}

FIPS_QINLINE __m512 scales16(const QSparseMatrix& Q, const GroupCursor& gc, int64_t k, int n) {
  const int64_t g = Q.group_size;
  if (g >= 16) {
    const __m512 s0 = _mm512_set1_ps(Q.scales[gc.gi]);
    const __m512 s1 = _mm512_set1_ps(Q.scales[std::min(gc.gi + 1, Q.nscales - 1)]);
    const __mmask16 ge = _mm512_cmpge_epi32_mask(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(static_cast<int>(g - gc.gr)));
    return _mm512_mask_blend_ps(ge, s0, s1);
  }
  alignas(64) float s[16];
  for (int i = 0; i < 16; ++i) s[i] = Q.scales[std::min((k + std::min(i, std::max(n - 1, 0))) / g, Q.nscales - 1)];
  return _mm512_load_ps(s);
}

// One step's dense 16 columns of row cursor i.
template <int BITS, bool GROUPED, bool SAFE>
FIPS_QINLINE __m512 step16(const QSparseMatrix& Q, __mmask16 m, int64_t& k, GroupCursor& gc) {
  const int n = __builtin_popcount(static_cast<unsigned>(m));
  __m512 raw = codes16<BITS, SAFE>(Q, k, n);
  if (GROUPED) {
    raw = _mm512_mul_ps(raw, scales16(Q, gc, k, n));
    gc.advance<16>(n, Q.group_size);
  }
  k += n;
  return _mm512_maskz_expand_ps(m, raw);
}

// transB = 0: P[tt, :] += sum over rows r..r+NR-1 of a[tt][i] * V[r + i, :].
template <int BITS, int TT, int NR, bool GROUPED, bool SAFE>
void qnn16_block(const QSparseMatrix& Q, const float* A, float* P, int64_t r) {
  const MaskTables& t = *Q.t;
  const int64_t rows = t.rows, cols = t.cols, c16 = cols & ~int64_t(15);
  const uint8_t* mk[NR];
  int64_t k[NR];
  GroupCursor gc[NR];
  __m512 a[TT][NR];
  #pragma GCC unroll 16
  for (int i = 0; i < NR; ++i) {
    mk[i] = Q.mask + ((static_cast<uint64_t>(r + i) * cols) >> 3);
    k[i] = t.row_off[r + i];
    if (GROUPED) gc[i].start(k[i], Q.group_size);
    const float rs = GROUPED ? 1.0f : Q.scales[r + i];
    #pragma GCC unroll 16
    for (int tt = 0; tt < TT; ++tt) a[tt][i] = _mm512_set1_ps(A[tt * rows + r + i] * rs);
  }
  for (int64_t c = 0; c < c16; c += 16) {
    __m512 x[NR];
    #pragma GCC unroll 16
    for (int i = 0; i < NR; ++i) x[i] = step16<BITS, GROUPED, SAFE>(Q, bits16(mk[i], c), k[i], gc[i]);
    #pragma GCC unroll 16
    for (int tt = 0; tt < TT; ++tt) {
      float* y = P + tt * cols + c;
      __m512 acc = _mm512_fmadd_ps(a[tt][0], x[0], _mm512_loadu_ps(y));
      #pragma GCC unroll 16
      for (int i = 1; i < NR; ++i) acc = _mm512_fmadd_ps(a[tt][i], x[i], acc);
      _mm512_storeu_ps(y, acc);
    }
  }
  if (c16 < cols) {  // the last 8 columns (cols % 16 == 8)
    __m512 x[NR];
    #pragma GCC unroll 16
    for (int i = 0; i < NR; ++i)
      x[i] = step16<BITS, GROUPED, true>(Q, static_cast<__mmask16>(mk[i][c16 >> 3]), k[i], gc[i]);
    #pragma GCC unroll 16
    for (int tt = 0; tt < TT; ++tt) {
      float* y = P + tt * cols + c16;
      __m512 acc = _mm512_fmadd_ps(a[tt][0], x[0], _mm512_maskz_loadu_ps(0xFF, y));
      #pragma GCC unroll 16
      for (int i = 1; i < NR; ++i) acc = _mm512_fmadd_ps(a[tt][i], x[i], acc);
      _mm512_mask_storeu_ps(y, 0xFF, acc);
    }
  }
}

// transB = 1: Y[tt, r + i] = V[r + i, :] . A[tt, :] for NR rows, TB tokens.
template <int BITS, int TB, int NR, bool GROUPED, bool SAFE>
void qnt16_block(const QSparseMatrix& Q, const float* A, float* Y, int64_t r) {
  const MaskTables& t = *Q.t;
  const int64_t rows = t.rows, cols = t.cols, c16 = cols & ~int64_t(15);
  const uint8_t* mk[NR];
  int64_t k[NR];
  GroupCursor gc[NR];
  __m512 acc[NR][TB];
  #pragma GCC unroll 16
  for (int i = 0; i < NR; ++i) {
    mk[i] = Q.mask + ((static_cast<uint64_t>(r + i) * cols) >> 3);
    k[i] = t.row_off[r + i];
    if (GROUPED) gc[i].start(k[i], Q.group_size);
    #pragma GCC unroll 16
    for (int tt = 0; tt < TB; ++tt) acc[i][tt] = _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < c16; c += 16) {
    __m512 av[TB];
    #pragma GCC unroll 16
    for (int tt = 0; tt < TB; ++tt) av[tt] = _mm512_loadu_ps(A + tt * cols + c);
    #pragma GCC unroll 16
    for (int i = 0; i < NR; ++i) {
      const __m512 x = step16<BITS, GROUPED, SAFE>(Q, bits16(mk[i], c), k[i], gc[i]);
      #pragma GCC unroll 16
      for (int tt = 0; tt < TB; ++tt) acc[i][tt] = _mm512_fmadd_ps(x, av[tt], acc[i][tt]);
    }
  }
  if (c16 < cols) {
    __m512 av[TB];
    #pragma GCC unroll 16
    for (int tt = 0; tt < TB; ++tt) av[tt] = _mm512_maskz_loadu_ps(0xFF, A + tt * cols + c16);
    #pragma GCC unroll 16
    for (int i = 0; i < NR; ++i) {
      const __m512 x = step16<BITS, GROUPED, true>(Q, static_cast<__mmask16>(mk[i][c16 >> 3]), k[i], gc[i]);
      #pragma GCC unroll 16
      for (int tt = 0; tt < TB; ++tt) acc[i][tt] = _mm512_fmadd_ps(x, av[tt], acc[i][tt]);
    }
  }
  #pragma GCC unroll 16
  for (int i = 0; i < NR; ++i) {
    const float rs = GROUPED ? 1.0f : Q.scales[r + i];
    #pragma GCC unroll 16
    for (int tt = 0; tt < TB; ++tt) Y[tt * rows + r + i] = _mm512_reduce_add_ps(acc[i][tt]) * rs;
  }
}

// ---- AVX-512 VBMI2 (+BW), int8 codes with per-row scales, cols % 64 == 0 ---------------------------
// One 64-column step per row: a 64-bit mask load and one vpexpandb (expand-load of the popcount code
// bytes straight to the lanes of their columns: it never reads past the row's codes), stored to a
// 64-byte buffer and converted 16 at a time (vpmovsxbd from memory, vcvtdq2ps). Per kept code this
// takes about half the shuffle-port work of the AVX-512F step (vpmovsxbd + vexpandps per 16 columns),
// which is what bounds the F kernel. Chosen at run time where the CPU has VBMI2 and BW
// (FIPS_QSPARSE_NO_VBMI2=1 keeps the F kernel; the tests run both).
#define FIPS_VBMI2 __attribute__((target("avx512f,avx512bw,avx512vbmi2")))

bool use_vbmi2() {
  static const bool ok = [] {
    if (env_opt_out("FIPS_QSPARSE_NO_VBMI2") || test_cpu_lacks("avx512vbmi2")) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("avx512bw");
  }();
  return ok;
}

template <int TT, int NR>
FIPS_VBMI2 void qnn64_i8_block(const QSparseMatrix& Q, const float* A, float* P, int64_t r) {
  const MaskTables& t = *Q.t;
  const int64_t rows = t.rows, cols = t.cols;
  const uint8_t* mk[NR];
  const uint8_t* cp[NR];
  __m512 a[TT][NR];
  alignas(64) int8_t buf[NR][64];
#pragma GCC unroll 16
  for (int i = 0; i < NR; ++i) {
    mk[i] = Q.mask + ((static_cast<uint64_t>(r + i) * cols) >> 3);
    cp[i] = Q.codes + t.row_off[r + i];
#pragma GCC unroll 16
    for (int tt = 0; tt < TT; ++tt) a[tt][i] = _mm512_set1_ps(A[tt * rows + r + i] * Q.scales[r + i]);
  }
  for (int64_t c = 0; c < cols; c += 64) {
#pragma GCC unroll 16
    for (int i = 0; i < NR; ++i) {
      uint64_t m;
      std::memcpy(&m, mk[i] + (c >> 3), sizeof(m));
      _mm512_store_si512(reinterpret_cast<__m512i*>(buf[i]), _mm512_maskz_expandloadu_epi8(m, cp[i]));
      cp[i] += __builtin_popcountll(m);
    }
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      __m512 x[NR];
#pragma GCC unroll 16
      for (int i = 0; i < NR; ++i)
        x[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(buf[i] + 16 * q))));
#pragma GCC unroll 16
      for (int tt = 0; tt < TT; ++tt) {
        float* y = P + tt * cols + c + 16 * q;
        __m512 acc = _mm512_fmadd_ps(a[tt][0], x[0], _mm512_loadu_ps(y));
#pragma GCC unroll 16
        for (int i = 1; i < NR; ++i) acc = _mm512_fmadd_ps(a[tt][i], x[i], acc);
        _mm512_storeu_ps(y, acc);
      }
    }
  }
}

template <int TB, int NR>
FIPS_VBMI2 void qnt64_i8_block(const QSparseMatrix& Q, const float* A, float* Y, int64_t r) {
  const MaskTables& t = *Q.t;
  const int64_t rows = t.rows, cols = t.cols;
  const uint8_t* mk[NR];
  const uint8_t* cp[NR];
  __m512 acc[NR][TB];
  alignas(64) int8_t buf[NR][64];
#pragma GCC unroll 16
  for (int i = 0; i < NR; ++i) {
    mk[i] = Q.mask + ((static_cast<uint64_t>(r + i) * cols) >> 3);
    cp[i] = Q.codes + t.row_off[r + i];
#pragma GCC unroll 16
    for (int tt = 0; tt < TB; ++tt) acc[i][tt] = _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < cols; c += 64) {
#pragma GCC unroll 16
    for (int i = 0; i < NR; ++i) {
      uint64_t m;
      std::memcpy(&m, mk[i] + (c >> 3), sizeof(m));
      _mm512_store_si512(reinterpret_cast<__m512i*>(buf[i]), _mm512_maskz_expandloadu_epi8(m, cp[i]));
      cp[i] += __builtin_popcountll(m);
    }
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      __m512 av[TB];
#pragma GCC unroll 16
      for (int tt = 0; tt < TB; ++tt) av[tt] = _mm512_loadu_ps(A + tt * cols + c + 16 * q);
#pragma GCC unroll 16
      for (int i = 0; i < NR; ++i) {
        const __m512 x =
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(buf[i] + 16 * q))));
#pragma GCC unroll 16
        for (int tt = 0; tt < TB; ++tt) acc[i][tt] = _mm512_fmadd_ps(x, av[tt], acc[i][tt]);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 16
    for (int tt = 0; tt < TB; ++tt) Y[tt * rows + r + i] = _mm512_reduce_add_ps(acc[i][tt]) * Q.scales[r + i];
}

// ---- AVX-512 VNNI (+VBMI2, BW): int8 codes with per-row scales, quantized activations ---------------
// activation_bits = 8 (docs/sparse-op.md): A is quantized per call to int8, symmetric, one float32 scale per
// block of the reduction axis, and the products are int8 x int8 dot products (vpdpbusd, 64 multiply-adds
// per instruction) accumulated exactly in int32, converted to float once per block.
//   transB = 1: xq[t, c] = round(A[t, c] / xs[t, b]), xs[t, b] = max |A[t, 128b .. 128b+127]| / 127 (the last
//     block 64 wide when cols % 128 == 64). Per 64-column step of a row: u = vpexpandb(mask bits, codes) ^ 0x80
//     (u8 = code + 128; a pruned column is 0 + 128) and d = vpdpbusd(d, u, xq), d starting each block at
//     minus the +128 part (-128 * the sum of xq per 4-byte lane, precomputed per call), so d is exactly
//     sum(code * xq) of the block in int32; then acc += float(d) * xs[b]. Y[t, r] = hsum(acc) * scales[r].
//   transB = 0: x'[t, r] = A[t, r] * scales[r] (the row's scale folded in), quantized per 64 rows
//     (xs[t, b] = max |x'| over the block's non-empty rows / 127; empty rows get 0). Four rows at a time: their
//     64-column code expansions are byte-interleaved (2 x 4 unpacks) so that each 4-byte lane holds one
//     column's codes of the 4 rows, then ^ 0x80 and vpdpbusd with the broadcast 4 bytes xq[t, r..r+3] into
//     int32 column accumulators (in L1, in the interleaved column order), which start each 64-row block at
//     -128 * sum(xq of the block); at the block's end P += xs[t, b] * float(acc). P is put back into column
//     order once, at the end.
// Exact integer arithmetic inside a block (|sum| <= 128 * 255 * 127 < 2**31), any int8 code incl. -128.
#define FIPS_VNNI __attribute__((target("avx512f,avx512bw,avx512vbmi2,avx512vnni")))

bool use_vnni() {
  static const bool ok = [] {
    if (env_opt_out("FIPS_QSPARSE_NO_VNNI") || test_cpu_lacks("avx512vnni") || test_cpu_lacks("avx512vbmi2"))
      return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi2") &&
           __builtin_cpu_supports("avx512bw");
  }();
  return ok;
}

// max |x[0..n)| for n % 16 == 0
FIPS_VNNI inline float absmax16(const float* x, int64_t n) {
  __m512 m = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
  return _mm512_reduce_max_ps(m);
}

struct ActNT {
  int64_t T, cols, nblk;
  Scratch<int8_t> q;     // [T][cols]
  Scratch<float> s;      // [T][nblk]
  Scratch<int32_t> nc;   // [T][nblk][16]: -128 * (sum of the block's codes in each dword lane)
  ActNT(const float* A, int64_t T_, int64_t cols_)
      : T(T_), cols(cols_), nblk(ceil_div(cols_, kActBlockNT)), q(static_cast<size_t>(T_ * cols_)),
        s(static_cast<size_t>(T_ * nblk)), nc(static_cast<size_t>(T_ * nblk * 16)) {
    quantize(A);
  }
  FIPS_VNNI void quantize(const float* A) {
    const __m512i k128 = _mm512_set1_epi8(static_cast<char>(0x80));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t b = 0; b < nblk; ++b) {
        const int64_t w = std::min(kActBlockNT, cols - b * kActBlockNT);
        const float* x = A + t * cols + b * kActBlockNT;
        const float amax = absmax16(x, w);
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        s.get()[t * nblk + b] = amax / 127.0f;
        const __m512 iv = _mm512_set1_ps(inv);
        __m512i c = _mm512_setzero_si512();
        for (int64_t h = 0; h < w; h += 64) {
          __m128i part[4];
          for (int j = 0; j < 4; ++j)
            part[j] = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + h + 16 * j), iv)));
          const __m512i xq = _mm512_inserti64x4(
              _mm512_castsi256_si512(_mm256_inserti128_si256(_mm256_castsi128_si256(part[0]), part[1], 1)),
              _mm256_inserti128_si256(_mm256_castsi128_si256(part[2]), part[3], 1), 1);
          _mm512_storeu_si512(q.get() + t * cols + b * kActBlockNT + h, xq);
          c = _mm512_dpbusd_epi32(c, k128, xq);
        }
        _mm512_storeu_si512(nc.get() + (t * nblk + b) * 16, _mm512_sub_epi32(_mm512_setzero_si512(), c));
      }
  }
};

// Software prefetch of a row's code stream (kPrefetchCodes bytes ahead of its cursor: ~15 rows of a 576-column V
// at density 0.47; 4 rows in flight = 16 KiB, inside L1d) and of the mask bytes the next row group reads at the
// same column (a decode call streams every V once from memory, and the expand-loads' variable advance is not
// what the hardware prefetchers follow well). Measured on the Zen 5 VM, FiPS int8 decode step, paired rounds:
// 512 bytes ahead 9.5 ms, 4096 8.4, 8192-16384 within noise of 4096 (an earlier layout: none 12.6-13.2 ms,
// 512 10.0-10.3). Prefetches never fault.
constexpr int kPrefetchCodes = 4096;
// The addresses are formed as integers: they may lie past the arrays (the last rows), never dereferenced.
FIPS_VNNI inline void prefetch_ahead(const uint8_t* codes, uintptr_t mask_addr) {
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(codes) + kPrefetchCodes), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(mask_addr), _MM_HINT_T0);
}

// Y[t0 + tt, r + i] for TB tokens and NR rows (all non-empty or not: an empty row gives 0).
template <int TB, int NR>
FIPS_VNNI void qnt64_vnni_block(const QSparseMatrix& Q, const ActNT& X, int64_t t0, float* Y, int64_t r) {
  const MaskTables& t = *Q.t;
  const int64_t rows = t.rows, cols = t.cols, nblk = X.nblk, rb = cols >> 3;
  const uint8_t* mk = Q.mask + ((static_cast<uint64_t>(r) * cols) >> 3);
  const uint8_t* cp[NR];
  __m512 acc[NR][TB];
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
#pragma GCC unroll 16
  for (int i = 0; i < NR; ++i) {
    cp[i] = Q.codes + t.row_off[r + i];
#pragma GCC unroll 16
    for (int tt = 0; tt < TB; ++tt) acc[i][tt] = _mm512_setzero_ps();
  }
  const int8_t* xq0 = X.q.get() + t0 * cols;
  const int32_t* nc0 = X.nc.get() + t0 * nblk * 16;
  const float* xs0 = X.s.get() + t0 * nblk;
  // the 64 codes of row i at columns [c, c + 64), + 128 (a pruned column: 0 + 128)
  auto step = [&](int i, int64_t c) FIPS_VNNI {
    uint64_t m;
    std::memcpy(&m, mk + i * rb + (c >> 3), sizeof(m));
    const __m512i u = _mm512_xor_si512(_mm512_maskz_expandloadu_epi8(m, cp[i]), flip);
    cp[i] += __builtin_popcountll(m);
    return u;
  };
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t c = b * kActBlockNT;
    const bool two = c + 64 < cols;
    __m512i xa[TB], xb[TB], nc[TB];
#pragma GCC unroll 16
    for (int tt = 0; tt < TB; ++tt) {
      xa[tt] = _mm512_loadu_si512(xq0 + tt * cols + c);
      xb[tt] = two ? _mm512_loadu_si512(xq0 + tt * cols + c + 64) : _mm512_setzero_si512();
      nc[tt] = _mm512_loadu_si512(nc0 + (tt * nblk + b) * 16);
    }
#pragma GCC unroll 16
    for (int i = 0; i < NR; ++i) {
      prefetch_ahead(cp[i], reinterpret_cast<uintptr_t>(mk) + static_cast<uintptr_t>((i + NR) * rb + (c >> 3)));
      const __m512i ua = step(i, c);
      const __m512i ub = two ? step(i, c + 64) : _mm512_setzero_si512();
#pragma GCC unroll 16
      for (int tt = 0; tt < TB; ++tt)
        acc[i][tt] = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_dpbusd_epi32(nc[tt], ua, xa[tt]), ub, xb[tt])),
            _mm512_set1_ps(xs0[tt * nblk + b]), acc[i][tt]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 16
    for (int tt = 0; tt < TB; ++tt) Y[(t0 + tt) * rows + r + i] = _mm512_reduce_add_ps(acc[i][tt]) * Q.scales[r + i];
}

template <int TB>
FIPS_VNNI void qnt64_vnni_rows(const QSparseMatrix& Q, const ActNT& X, int64_t t0, float* Y, int64_t r0, int64_t r1) {
  const MaskTables& t = *Q.t;
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    if (t.row_off[r + 4] == t.row_off[r]) {
      for (int tt = 0; tt < TB; ++tt) std::fill(Y + (t0 + tt) * t.rows + r, Y + (t0 + tt) * t.rows + r + 4, 0.0f);
    } else {
      qnt64_vnni_block<TB, 4>(Q, X, t0, Y, r);
    }
  }
  for (; r < r1; ++r) qnt64_vnni_block<TB, 1>(Q, X, t0, Y, r);
}

// transB = 0: x' = A * scales (per row), quantized per 64 rows; 4-row groups padded with zero codes.
struct ActNN {
  int64_t T, rows, rowsp, nblk;
  Scratch<int8_t> q;     // [T][rowsp] (rowsp = rows rounded up to 64, zeros past rows and for empty rows)
  Scratch<float> s;      // [T][nblk]
  Scratch<int32_t> c;    // [T][nblk]: -128 * sum of the block's codes
  ActNN(const QSparseMatrix& Q, const float* A, int64_t T_)
      : T(T_), rows(Q.t->rows), rowsp(ceil_div(Q.t->rows, kActBlock) * kActBlock), nblk(rowsp / kActBlock),
        q(static_cast<size_t>(T_ * rowsp)), s(static_cast<size_t>(T_ * nblk)), c(static_cast<size_t>(T_ * nblk)) {
    const MaskTables& t = *Q.t;
    std::vector<float> x(static_cast<size_t>(kActBlock));
    for (int64_t tt = 0; tt < T; ++tt)
      for (int64_t b = 0; b < nblk; ++b) {
        const int64_t r0 = b * kActBlock, r1 = std::min(rows, r0 + kActBlock);
        float amax = 0.0f;
        for (int64_t r = r0; r < r1; ++r) {
          const float v = t.row_off[r + 1] != t.row_off[r] ? A[tt * rows + r] * Q.scales[r] : 0.0f;
          x[static_cast<size_t>(r - r0)] = v;
          amax = std::max(amax, std::fabs(v));
        }
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        s.get()[tt * nblk + b] = amax / 127.0f;
        int32_t sum = 0;
        for (int64_t r = r0; r < r1; ++r) {
          const float y = std::nearbyint(x[static_cast<size_t>(r - r0)] * inv);
          const int v = static_cast<int>(std::max(-127.0f, std::min(127.0f, y)));
          q.get()[tt * rowsp + r] = static_cast<int8_t>(v);
          sum += v;
        }
        c.get()[tt * nblk + b] = -128 * sum;
      }
  }
};

// Rows [r0, r1) (r0 a multiple of 64), TT tokens from t0, into P [TT][cols] (interleaved column order,
// added to); acc [TT][cols] int32 scratch.
template <int TT>
FIPS_VNNI void qnn64_vnni_rows(const QSparseMatrix& Q, const ActNN& X, int64_t t0, float* P, int32_t* acc,
                               int64_t r0, int64_t r1) {
  const MaskTables& t = *Q.t;
  const int64_t cols = t.cols;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t bs = r0; bs < r1; bs += kActBlock) {
    const int64_t be = std::min(r1, bs + kActBlock), b = bs / kActBlock;
    if (t.row_off[be] == t.row_off[bs]) continue;
#pragma GCC unroll 4
    for (int tt = 0; tt < TT; ++tt) {
      const __m512i c0 = _mm512_set1_epi32(X.c.get()[(t0 + tt) * X.nblk + b]);
      for (int64_t c = 0; c < cols; c += 16) _mm512_store_si512(acc + tt * cols + c, c0);
    }
    for (int64_t r = bs; r < be; r += 4) {
      const int nr = static_cast<int>(std::min<int64_t>(4, be - r));
      if (t.row_off[r + nr] == t.row_off[r]) continue;
      __m512i xb[TT];
#pragma GCC unroll 4
      for (int tt = 0; tt < TT; ++tt) {
        int32_t w;
        std::memcpy(&w, X.q.get() + (t0 + tt) * X.rowsp + r, sizeof(w));  // zeros past nr (rowsp padding)
        xb[tt] = _mm512_set1_epi32(w);
      }
      const uint8_t* mk[4];
      const uint8_t* cp[4];
      uint64_t keep[4];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const int64_t ri = i < nr ? r + i : r;
        mk[i] = Q.mask + ((static_cast<uint64_t>(ri) * cols) >> 3);
        cp[i] = Q.codes + t.row_off[ri];
        keep[i] = i < nr ? ~uint64_t(0) : 0;
      }
      for (int64_t c = 0; c < cols; c += 64) {
        __m512i a[4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          prefetch_ahead(cp[i], reinterpret_cast<uintptr_t>(mk[i]) + static_cast<uintptr_t>((c >> 3) + 4 * (cols >> 3)));
          uint64_t m;
          std::memcpy(&m, mk[i] + (c >> 3), sizeof(m));
          m &= keep[i];
          a[i] = _mm512_maskz_expandloadu_epi8(m, cp[i]);
          cp[i] += __builtin_popcountll(m);
        }
        const __m512i t0v = _mm512_unpacklo_epi8(a[0], a[1]), t1v = _mm512_unpackhi_epi8(a[0], a[1]);
        const __m512i t2v = _mm512_unpacklo_epi8(a[2], a[3]), t3v = _mm512_unpackhi_epi8(a[2], a[3]);
        const __m512i u[4] = {_mm512_xor_si512(_mm512_unpacklo_epi16(t0v, t2v), flip),
                              _mm512_xor_si512(_mm512_unpackhi_epi16(t0v, t2v), flip),
                              _mm512_xor_si512(_mm512_unpacklo_epi16(t1v, t3v), flip),
                              _mm512_xor_si512(_mm512_unpackhi_epi16(t1v, t3v), flip)};
#pragma GCC unroll 4
        for (int tt = 0; tt < TT; ++tt) {
          int32_t* ac = acc + tt * cols + c;
#pragma GCC unroll 4
          for (int k = 0; k < 4; ++k)
            _mm512_store_si512(ac + 16 * k, _mm512_dpbusd_epi32(_mm512_load_si512(ac + 16 * k), u[k], xb[tt]));
        }
      }
    }
#pragma GCC unroll 4
    for (int tt = 0; tt < TT; ++tt) {
      const __m512 xs = _mm512_set1_ps(X.s.get()[(t0 + tt) * X.nblk + b]);
      float* p = P + tt * cols;
      const int32_t* ac = acc + tt * cols;
      for (int64_t c = 0; c < cols; c += 16)
        _mm512_store_ps(p + c, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(ac + c)), xs, _mm512_load_ps(p + c)));
    }
  }
}

// out[c] = P[c] with the interleaved order of qnn64_vnni_rows undone (64 columns at a time: lane 4L + j of
// register k holds column 16L + 4k + j); add: out += instead of =.
FIPS_VNNI void vnni_unpermute(const float* P, int64_t cols, float* out, bool add) {
  for (int64_t c = 0; c < cols; c += 64) {
    const __m512 p0 = _mm512_load_ps(P + c), p1 = _mm512_load_ps(P + c + 16), p2 = _mm512_load_ps(P + c + 32),
                 p3 = _mm512_load_ps(P + c + 48);
    const __m512 a = _mm512_shuffle_f32x4(p0, p1, 0x44), bb = _mm512_shuffle_f32x4(p0, p1, 0xEE);
    const __m512 d = _mm512_shuffle_f32x4(p2, p3, 0x44), e = _mm512_shuffle_f32x4(p2, p3, 0xEE);
    const __m512 o[4] = {_mm512_shuffle_f32x4(a, d, 0x88), _mm512_shuffle_f32x4(a, d, 0xDD),
                         _mm512_shuffle_f32x4(bb, e, 0x88), _mm512_shuffle_f32x4(bb, e, 0xDD)};
    for (int k = 0; k < 4; ++k) {
      float* y = out + c + 16 * k;
      _mm512_storeu_ps(y, add ? _mm512_add_ps(_mm512_loadu_ps(y), o[k]) : o[k]);
    }
  }
}

void qnn_vnni(const QSparseMatrix& Q, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
  const MaskTables& t = *Q.t;
  const int64_t cols = t.cols;
  const ActNN X(Q, A, T);
  // row slices of whole 64-row blocks; a fixed split (by non-empty rows), partial sums added in slice order
  const int64_t nblk = X.nblk;
  const int64_t nsplit = std::min<int64_t>(nblk, act8_tasks(t, T, 8));
  const std::vector<int64_t> bound = live_row_bounds(t, nsplit, kActBlock);
  std::vector<float> partial(static_cast<size_t>((nsplit - 1) * T * cols));
  run_tasks(runner, static_cast<size_t>(nsplit), [&](size_t i) {
    const int64_t r0 = bound[i], r1 = bound[i + 1];
    float* out = i == 0 ? Y : partial.data() + (i - 1) * T * cols;
    const int64_t tb = std::min<int64_t>(T, 4);
    Scratch<float> P(static_cast<size_t>(tb * cols));
    Scratch<int32_t> acc(static_cast<size_t>(tb * cols));
    for (int64_t t0 = 0; t0 < T; t0 += 4) {
      const int64_t n = std::min<int64_t>(4, T - t0);
      if (t0) std::memset(P.get(), 0, static_cast<size_t>(tb * cols) * sizeof(float));
      switch (n) {
        case 1: qnn64_vnni_rows<1>(Q, X, t0, P.get(), acc.get(), r0, r1); break;
        case 2: qnn64_vnni_rows<2>(Q, X, t0, P.get(), acc.get(), r0, r1); break;
        case 3: qnn64_vnni_rows<3>(Q, X, t0, P.get(), acc.get(), r0, r1); break;
        default: qnn64_vnni_rows<4>(Q, X, t0, P.get(), acc.get(), r0, r1); break;
      }
      for (int64_t tt = 0; tt < n; ++tt) vnni_unpermute(P.get() + tt * cols, cols, out + (t0 + tt) * cols, false);
    }
  });
  add_partials(Y, partial.data(), nsplit - 1, T * cols);
}

void qnt_vnni(const QSparseMatrix& Q, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
  const MaskTables& t = *Q.t;
  const ActNT X(A, T, t.cols);
  const int64_t ntask = std::min<int64_t>(ceil_div(t.rows, 32), act8_tasks(t, T, 16));
  const std::vector<int64_t> bound = live_row_bounds(t, ntask, 4);
  run_tasks(runner, static_cast<size_t>(ntask), [&](size_t i) {
    for (int64_t t0 = 0; t0 < T; t0 += 4) {
      switch (std::min<int64_t>(4, T - t0)) {
        case 1: qnt64_vnni_rows<1>(Q, X, t0, Y, bound[i], bound[i + 1]); break;
        case 2: qnt64_vnni_rows<2>(Q, X, t0, Y, bound[i], bound[i + 1]); break;
        case 3: qnt64_vnni_rows<3>(Q, X, t0, Y, bound[i], bound[i + 1]); break;
        default: qnt64_vnni_rows<4>(Q, X, t0, Y, bound[i], bound[i + 1]); break;
      }
    }
  });
}

// The quantized-activation kernels apply (else the exact kernels run).
bool act8_applies(const QSparseMatrix& Q) { return act8_layout(Q) && use_vnni(); }
#endif  // FIPS_HAVE_AVX512

// Rows [r0, r1) of V, TT tokens (TT <= 4), into P [TT, cols] (overwritten): transB = 0.
template <int BITS, int TT, bool GROUPED, bool ALIGNED>
void qnn_rows(const QSparseMatrix& Q, const float* A, float* P, int64_t r0, int64_t r1, int64_t fast) {
  const MaskTables& t = *Q.t;
  std::fill(P, P + TT * t.cols, 0.0f);
  int64_t r = r0;
#if FIPS_HAVE_AVX512
  if constexpr (BITS == 8 && !GROUPED && ALIGNED) {
    if (t.cols % 64 == 0 && use_vbmi2()) {
      for (; r + 4 <= r1; r += 4)
        if (t.row_off[r + 4] != t.row_off[r]) qnn64_i8_block<TT, 4>(Q, A, P, r);
      for (; r < r1; ++r)
        if (t.row_off[r + 1] != t.row_off[r]) qnn64_i8_block<TT, 1>(Q, A, P, r);
      return;
    }
  }
  if (ALIGNED) {
    for (; r + 4 <= r1; r += 4) {
      if (t.row_off[r + 4] == t.row_off[r]) continue;
      if (r + 4 <= fast) qnn16_block<BITS, TT, 4, GROUPED, false>(Q, A, P, r);
      else break;
    }
    for (; r < r1; ++r) {
      if (t.row_off[r + 1] == t.row_off[r]) continue;
      if (r < fast) qnn16_block<BITS, TT, 1, GROUPED, false>(Q, A, P, r);
      else qnn16_block<BITS, TT, 1, GROUPED, true>(Q, A, P, r);
    }
    return;
  }
#endif
  for (; r < r1; ++r) {
    if (t.row_off[r + 1] == t.row_off[r]) continue;
    if (r < fast) qnn8_row<BITS, TT, GROUPED, ALIGNED, false>(Q, A, P, r);
    else qnn8_row<BITS, TT, GROUPED, ALIGNED, true>(Q, A, P, r);
  }
}

template <int BITS, int TB, bool GROUPED, bool ALIGNED>
void qnt_rows(const QSparseMatrix& Q, const float* A, float* Y, int64_t r0, int64_t r1, int64_t fast) {
  const MaskTables& t = *Q.t;
  const int64_t rows = t.rows;
  int64_t r = r0;
  auto zero_rows = [&](int64_t a, int64_t b) {
    for (int tt = 0; tt < TB; ++tt) std::fill(Y + tt * rows + a, Y + tt * rows + b, 0.0f);
  };
#if FIPS_HAVE_AVX512
  if constexpr (BITS == 8 && !GROUPED && ALIGNED) {
    if (t.cols % 64 == 0 && use_vbmi2()) {
      for (; r + 4 <= r1; r += 4) {
        if (t.row_off[r + 4] == t.row_off[r]) zero_rows(r, r + 4);
        else qnt64_i8_block<TB, 4>(Q, A, Y, r);
      }
      for (; r < r1; ++r) {
        if (t.row_off[r + 1] == t.row_off[r]) zero_rows(r, r + 1);
        else qnt64_i8_block<TB, 1>(Q, A, Y, r);
      }
      return;
    }
  }
  if (ALIGNED) {
    for (; r + 4 <= r1; r += 4) {
      if (t.row_off[r + 4] == t.row_off[r]) {
        zero_rows(r, r + 4);
        continue;
      }
      if (r + 4 <= fast) qnt16_block<BITS, TB, 4, GROUPED, false>(Q, A, Y, r);
      else break;
    }
    for (; r < r1; ++r) {
      if (t.row_off[r + 1] == t.row_off[r]) zero_rows(r, r + 1);
      else if (r < fast) qnt16_block<BITS, TB, 1, GROUPED, false>(Q, A, Y, r);
      else qnt16_block<BITS, TB, 1, GROUPED, true>(Q, A, Y, r);
    }
    return;
  }
#endif
  for (; r < r1; ++r) {
    if (t.row_off[r + 1] == t.row_off[r]) zero_rows(r, r + 1);
    else if (r < fast) qnt8_row<BITS, TB, GROUPED, ALIGNED, false>(Q, A, Y, r);
    else qnt8_row<BITS, TB, GROUPED, ALIGNED, true>(Q, A, Y, r);
  }
}

// Compile-time dispatch of (bits, group mode, alignment) for a callable taking the template args.
template <template <int, int, bool, bool> class K, int TT, class... Args>
void by_kind(const QSparseMatrix& Q, Args&&... args) {
  const bool grouped = Q.group_size > 0, aligned = Q.t->cols % 8 == 0;
  if (Q.bits == 8) {
    if (grouped) aligned ? K<8, TT, true, true>::run(args...) : K<8, TT, true, false>::run(args...);
    else aligned ? K<8, TT, false, true>::run(args...) : K<8, TT, false, false>::run(args...);
  } else {
    if (grouped) aligned ? K<4, TT, true, true>::run(args...) : K<4, TT, true, false>::run(args...);
    else aligned ? K<4, TT, false, true>::run(args...) : K<4, TT, false, false>::run(args...);
  }
}

template <int BITS, int TT, bool GROUPED, bool ALIGNED>
struct NNRows {
  static void run(const QSparseMatrix& Q, const float* A, float* P, int64_t r0, int64_t r1, int64_t fast) {
    qnn_rows<BITS, TT, GROUPED, ALIGNED>(Q, A, P, r0, r1, fast);
  }
};
template <int BITS, int TB, bool GROUPED, bool ALIGNED>
struct NTRows {
  static void run(const QSparseMatrix& Q, const float* A, float* Y, int64_t r0, int64_t r1, int64_t fast) {
    qnt_rows<BITS, TB, GROUPED, ALIGNED>(Q, A, Y, r0, r1, fast);
  }
};

template <template <int, int, bool, bool> class K>
void by_tokens(int64_t tt, const QSparseMatrix& Q, const float* A, float* P, int64_t r0, int64_t r1, int64_t fast) {
  switch (tt) {
    case 1: by_kind<K, 1>(Q, Q, A, P, r0, r1, fast); break;
    case 2: by_kind<K, 2>(Q, Q, A, P, r0, r1, fast); break;
    case 3: by_kind<K, 3>(Q, Q, A, P, r0, r1, fast); break;
    default: by_kind<K, 4>(Q, Q, A, P, r0, r1, fast); break;
  }
}

constexpr int64_t kTokBlock = 4;  // tokens per register block of the fused kernels

void qnn_simd(const QSparseMatrix& Q, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
#if FIPS_HAVE_AVX512
  if (act8_applies(Q)) return qnn_vnni(Q, A, T, Y, runner);
#endif
  const MaskTables& t = *Q.t;
  const int64_t rows = t.rows, cols = t.cols;
  const int64_t fast = fast_rows(Q);
  // rows split into nsplit slices (partial sums, added in slice order: deterministic)
  const int64_t nsplit = std::max<int64_t>(1, std::min<int64_t>(8, rows / 64));
  const std::vector<int64_t> bound = balanced_rows(t, nsplit, 4);
  std::vector<float> partial(static_cast<size_t>((nsplit - 1) * T * cols));
  run_tasks(runner, static_cast<size_t>(nsplit), [&](size_t i) {
    float* P = i == 0 ? Y : partial.data() + (i - 1) * T * cols;
    for (int64_t t0 = 0; t0 < T; t0 += kTokBlock)
      by_tokens<NNRows>(std::min(kTokBlock, T - t0), Q, A + t0 * rows, P + t0 * cols, bound[i], bound[i + 1], fast);
  });
  add_partials(Y, partial.data(), nsplit - 1, T * cols);
}

void qnt_simd(const QSparseMatrix& Q, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
#if FIPS_HAVE_AVX512
  if (act8_applies(Q)) return qnt_vnni(Q, A, T, Y, runner);
#endif
  if (act8_layout(Q)) return qnt_act8_avx2(Q, A, T, Y, runner);
  const MaskTables& t = *Q.t;
  const int64_t rows = t.rows, cols = t.cols;
  const int64_t fast = fast_rows(Q);
  const int64_t ntask = std::max<int64_t>(1, std::min<int64_t>(16, ceil_div(rows, 32)));
  const std::vector<int64_t> bound = balanced_rows(t, ntask, 4);
  run_tasks(runner, static_cast<size_t>(ntask), [&](size_t i) {
    for (int64_t t0 = 0; t0 < T; t0 += kTokBlock)
      by_tokens<NTRows>(std::min(kTokBlock, T - t0), Q, A + t0 * cols, Y + t0 * rows, bound[i], bound[i + 1], fast);
  });
}

void dequant_range(const QSparseMatrix& Q, int64_t k0, int64_t k1, float* out) {
  for_segments(Q, k0, k1, [&](int64_t a, int64_t b, float s) {
    const __m256 sv = _mm256_set1_ps(s);
    int64_t k = a;
    for (; k + 8 <= b && k + 32 <= Q.t->nnz; k += 8) {
      const __m256 x = Q.bits == 8 ? codes8<8, false>(Q, k, 8) : codes8<4, false>(Q, k, 8);
      _mm256_storeu_ps(out + k, _mm256_mul_ps(x, sv));
    }
    for (; k < b; ++k) out[k] = static_cast<float>(code_at(Q, k)) * s;
  });
}
#endif  // FIPS_HAVE_AVX2

}  // namespace

void qspmm_nn(const QSparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
  if (T <= 0) return;
#if FIPS_HAVE_AVX2
  qnn_simd(V, A, T, Y, runner);
#else
  qnn_scalar(V, A, T, Y, runner);
#endif
}

void qspmm_nt(const QSparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& runner) {
  if (T <= 0) return;
#if FIPS_HAVE_AVX2
  qnt_simd(V, A, T, Y, runner);
#else
  qnt_scalar(V, A, T, Y, runner);
#endif
}

void qdequantize(const QSparseMatrix& V, float* out, const TaskRunner& runner) {
  const int64_t nnz = V.t->nnz;
  const int64_t ntask = std::max<int64_t>(1, std::min<int64_t>(16, nnz / 65536));
  run_tasks(runner, static_cast<size_t>(ntask), [&](size_t i) {
    const int64_t k0 = nnz * static_cast<int64_t>(i) / ntask, k1 = nnz * (static_cast<int64_t>(i) + 1) / ntask;
    dequant_range(V, k0, k1, out);
  });
}

}  // namespace FIPS_LEVEL_NS
}  // namespace fips
