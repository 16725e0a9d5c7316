// Sparse x dense products for the fips sparse format (docs/sparse-op.md), CPU.
//
// V [rows, cols] is stored as
//   values: float32[nnz]  kept entries in increasing row-major flat index order
//   mask:   uint8[ceil(rows*cols/8)], entry i = row*cols + col is kept iff
//           (mask[i >> 3] >> (i & 7)) & 1   (little-endian bit order, rows NOT byte-padded)
//
// Two products (T tokens, A row-major [T, K]):
//   transB = 0: Y[T, cols] = A[T, rows] @ V       (sparse axpy over the rows of V)
//   transB = 1: Y[T, rows] = A[T, cols] @ V^T     (sparse dot product per row of V)
//
// Nothing here builds a per-nonzero index. The only side tables are
//   row_off[rows + 1]            : index into `values` of the first kept entry of each row
//   chunk_off[rows * nchunks]    : (transB = 0 only) offset, relative to row_off[r], of the
//                                  first kept entry at column  j * kChunkCols  of row r
// i.e. popcount prefix sums at row / column-chunk granularity (a few KiB per weight).
//
// The inner loops walk the bitmask 8 columns ("one group") at a time:
//   m   = the 8 mask bits of the group (one byte when the row starts byte-aligned, else
//         two bytes shifted by the bit offset)
//   x   = the 8 dense values of the group: load the next 8 entries of `values`, move entry
//         k to the lane of the k-th set bit of m (one _mm256_permutevar8x32_ps with a
//         256-entry table), zero the lanes whose bit is clear
//   v  += popcount(m)    (advance the values pointer by the number of kept entries)
// so each group costs a handful of instructions whatever its density, and x is reused for
// every token in a register block.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fips {

// Granularity of the column-chunk offset table (a multiple of 64, so chunk starts are
// byte- and word-aligned in every row whose start is byte-aligned).
constexpr int64_t kChunkCols = 256;

struct MaskTables {
  int64_t rows = 0, cols = 0;
  int64_t nnz = 0;                  // number of set bits in the first rows*cols bits
  int64_t nchunks = 0;              // ceil(cols / kChunkCols)
  int64_t fast_rows = 0;            // rows [0, fast_rows) may read 8 floats past any entry
  std::vector<int64_t> row_off;     // [rows + 1]
  std::vector<uint32_t> chunk_off;  // [rows * nchunks], empty unless built with chunks
};

// Builds the tables for a mask (O(mask bytes), popcount based).
void build_tables(const uint8_t* mask, int64_t rows, int64_t cols, bool with_chunks,
                  MaskTables* out);

struct SparseMatrix {
  const float* values;
  const uint8_t* mask;
  size_t mask_bytes;
  const MaskTables* t;
};

// Runs task(i) for i in [0, n); may run tasks concurrently. Every task writes a disjoint
// part of Y and the order of the floating-point sums inside an output element does not
// depend on the split, so results are deterministic whatever the thread count.
struct TaskRunner {
  virtual void run(size_t n, void (*fn)(void*, size_t), void* arg) const = 0;
  virtual ~TaskRunner() = default;
};

// Y[T, cols] = A[T, rows] @ V
void spmm_nn(const SparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& run);
// Y[T, rows] = A[T, cols] @ V^T
void spmm_nt(const SparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& run);

// true when the AVX2/FMA code path is compiled in and not disabled via
// FIPS_SPARSE_FORCE_SCALAR=1 (read once).
bool simd_enabled();
const char* kernel_isa();

}  // namespace fips
