// Mask-walk helpers shared by the per-level kernel sources (sparse_kernels.cc, qsparse_kernels.cc).
//
// Included by those files AFTER they define FIPS_LEVEL_NS and FIPS_HAVE_AVX2 (and include <algorithm>,
// <cstring>, <vector>, sparse_kernels.h; <immintrin.h> at the AVX2 levels): everything below lands in
// fips::<level>::(anonymous), i.e. it has internal linkage in each level's object, so no inline function
// compiled with one level's flags can be merged by the linker into another level's (or the baseline's)
// code (runtime/kernel_build.py, tests/test_native_kernel.py). No target attributes: the instruction set
// is the including object's -m flags (add_partials exists at the AVX2 levels only).
#pragma once

#ifndef FIPS_LEVEL_NS
#error "mask_walk.h is included by the per-level kernel sources after FIPS_LEVEL_NS is defined"
#endif
#ifndef FIPS_HAVE_AVX2
#error "mask_walk.h needs FIPS_HAVE_AVX2 (0 or 1; 1 after <immintrin.h>) defined by the including source"
#endif

namespace fips {
namespace FIPS_LEVEL_NS {
namespace {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool bit_at(const uint8_t* mask, uint64_t p) { return (mask[p >> 3] >> (p & 7)) & 1u; }

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

// The low n bits set (n <= 8: the mask of a partial last group).
inline unsigned low_bits(int n) { return n >= 8 ? 0xFFu : ((1u << n) - 1u); }

// Reader for the groups of one row (row start at bit `base`): byte loads through a row
// pointer when rows are byte-aligned, else the straddling read.
template <bool ALIGNED>
struct RowBits {
  const uint8_t* mask;
  size_t nbytes;
  uint64_t base;
  const uint8_t* row;
  RowBits(const uint8_t* m, size_t nb, uint64_t b) : mask(m), nbytes(nb), base(b), row(m + (b >> 3)) {}
  // bits of columns [c, c+8); c is a multiple of 8 when ALIGNED
  unsigned operator()(int64_t c) const { return ALIGNED ? row[c >> 3] : bits8(mask, nbytes, base + c); }
};

// Packs a callable into the (fn, arg) pair the TaskRunner wants.
template <class F>
void run_tasks(const TaskRunner& runner, size_t n, F&& f) {
  if (n == 0) return;
  struct Tramp {
    static void call(void* p, size_t i) { (*static_cast<F*>(p))(i); }
  };
  runner.run(n, &Tramp::call, static_cast<void*>(&f));
}

// Row boundaries of `parts` slices holding about the same number of kept entries (the work of
// the few-token kernels), each boundary a multiple of `align` rows. Pruning empties rows very
// unevenly (the weakest basis directions of a FiPS V lose all their entries, the strongest
// keep most), so equal row counts would leave one thread with most of the work. Depends only
// on the mask, so the summation order stays fixed for every thread count.
[[maybe_unused]] std::vector<int64_t> balanced_rows(const MaskTables& t, int64_t parts, int64_t align) {
  std::vector<int64_t> b(static_cast<size_t>(parts) + 1, t.rows);
  b[0] = 0;
  for (int64_t k = 1; k < parts; ++k) {
    const int64_t target = t.nnz * k / parts;
    int64_t r = std::lower_bound(t.row_off.begin(), t.row_off.end(), target) - t.row_off.begin();
    r = std::min(t.rows, (r + align / 2) / align * align);
    b[k] = std::max(b[k - 1], r);
  }
  return b;
}

#if FIPS_HAVE_AVX2
// Adds `nparts` partial outputs of n floats each (stored one after another from `partial`) into
// Y[0, n), in part order: the few-token kernels that split the reduction dimension into row slices
// sum slice 0 straight into Y and the others into `partial`, so the result is the same whichever
// thread ran which slice. AVX2 levels only (compiled with that level's -m flags, like the rest).
inline void add_partials(float* Y, const float* partial, int64_t nparts, int64_t n) {
  for (int64_t i = 0; i < nparts; ++i) {
    const float* P = partial + i * n;
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) _mm256_storeu_ps(Y + k, _mm256_add_ps(_mm256_loadu_ps(Y + k), _mm256_loadu_ps(P + k)));
    for (; k < n; ++k) Y[k] += P[k];
  }
}
#endif  // FIPS_HAVE_AVX2

}  // namespace
}  // namespace FIPS_LEVEL_NS
}  // namespace fips
