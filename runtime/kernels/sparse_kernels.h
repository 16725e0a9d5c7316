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
// Nothing here builds or keeps a per-nonzero index. The only side tables (built once per
// weight when the mask is an initializer) are popcount prefix sums:
//   row_off[rows + 1]            : index into `values` of the first kept entry of each row
//   chunk_off[rows * nchunks]    : (transB = 0 only) offset, relative to row_off[r], of the
//                                  first kept entry at column  j * kChunkCols  of row r
// i.e. 8 bytes per row + 4 bytes per 128 columns of a row (SmolLM2 V 1024x1536: 56 KiB,
// 3% of its values).
//
// Few tokens (decode): the inner loops walk the bitmask 8 columns ("one group") at a time:
//   m   = the 8 mask bits of the group (one byte when the row starts byte-aligned, else
//         two bytes shifted by the bit offset)
//   x   = the 8 dense values of the group: load the next 8 entries of `values`, move entry
//         k to the lane of the k-th set bit of m (one _mm256_permutevar8x32_ps with a
//         256-entry table), zero the lanes whose bit is clear
//   v  += popcount(m)    (advance the values pointer by the number of kept entries)
// then y[c:c+8] += a * x (transB = 0) or acc += x * A[c:c+8] (transB = 1), for each token
// of a small register block; a group costs the same few instructions whatever its density.
// At the AVX-512F level (chosen at run time on a CPU that has it) the few-token kernels take 16
// columns per step: a 16-bit mask load and one vexpandps replace the table permute.
// Both read V once per call as a stream; they prefetch the next row block's values and mask
// bits in software, spread over the current block's steps (the hardware prefetchers alone
// left them at about half the memory bandwidth), skip rows that pruning emptied, and split
// the rows between tasks by kept entries, not by row count.
// Multi-row decode (9..16 tokens: one token of each sequence of a batch, fips serve): A is
// transposed once per call into ONE 16-token block, and both products use the entry-list loops
// below on it: each mask group is decoded once per call (AVX-512F: 16 columns per vpcompressd)
// and each kept entry is one broadcast-FMA over the 16 token lanes, instead of one pass over V
// per register block of 4 or 8 tokens. FIPS_SPARSE_MULTIROW=0 (read once per process) turns it
// off, for A/B measurements (benchmarks/kernel_bench.py --multirow).
// Many tokens (prefill): A is transposed once per call into 32-token blocks (64-byte
// aligned); the kept entries of a row (or of a 128-column chunk of it) are listed (column
// offsets, in a small per-thread scratch buffer) and each one is applied to the 32 tokens
// of a block at once (see nt_big_task / nn_big_task in sparse_kernels.cc; 16-lane
// versions with AVX-512F).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fips {

// Granularity of the column-chunk offset table (a multiple of 64, so chunk starts are
// byte- and word-aligned in every row whose start is byte-aligned; 128 columns x 32 tokens
// x 4 bytes = the 16 KiB L1 tile of the many-token kernels).
constexpr int64_t kChunkCols = 128;

// The validity rule of docs/sparse-op.md for the attributes: 1 <= rows, 1 <= cols and
// rows * cols <= kMaxBits (the reference function body indexes V with int32), computed with
// overflow-checked arithmetic. Every size the kernel derives from the attributes is then
// bounded by the mask's length: rows + 1 <= 8 * nbytes + 1, ceil(cols / 128) * rows <= bits.
constexpr int64_t kMaxBits = (int64_t(1) << 31) - 1;

// nullptr when (rows, cols) satisfy the rule (then *bits = rows * cols and *nbytes =
// ceil(bits / 8)), else a static message saying what is wrong.
const char* check_dims(int64_t rows, int64_t cols, int64_t* bits, int64_t* nbytes);

struct MaskTables {
  int64_t rows = 0, cols = 0;
  int64_t nnz = 0;                  // number of set bits in the first rows*cols bits
  int64_t nchunks = 0;              // ceil(cols / kChunkCols)
  int64_t fast_rows = 0;            // rows [0, fast_rows) may read 8 floats past any entry
  std::vector<int64_t> row_off;     // [rows + 1]
  std::vector<uint32_t> chunk_off;  // [rows * nchunks], empty unless built with chunks
};

// Builds the tables for a mask (O(mask bytes), popcount based). Checks its preconditions
// itself (check_dims, and mask_bytes == ceil(rows * cols / 8) exactly) before allocating
// anything; throws std::invalid_argument when they do not hold.
void build_tables(const uint8_t* mask, size_t mask_bytes, int64_t rows, int64_t cols, bool with_chunks,
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

// Kernel levels. sparse_kernels.cc is compiled once per level, each time with that level's
// instruction-set flags and its products in the level's namespace (runtime/kernel_build.py):
//   fips::portable  baseline flags of the target (x86-64, aarch64, ...): scalar loops
//   fips::avx2      -mavx2 -mfma -mpopcnt (x86-64 only)
//   fips::avx512    -mavx512f -mavx2 -mfma -mpopcnt (x86-64 only)
// sparse_dispatch.cc (baseline flags) picks one the first time it is asked, from the CPU's
// features, unless the environment forces one:
//   FIPS_SPARSE_ISA=auto|portable|avx2|avx512   (also "scalar" = portable, "avx512f" = avx512)
//   FIPS_SPARSE_FORCE_SCALAR=1                  portable (wins over FIPS_SPARSE_ISA)
// A forced level that this CPU (or this build) lacks is an error: kernel_select_error() says
// it in one line and the library refuses to register. Test-only: FIPS_SPARSE_TEST_CPU_LACKS=
// avx512f,avx2,fma,popcnt (a comma list) makes the dispatcher treat those features as absent.
#define FIPS_DECLARE_KERNEL_LEVEL(ns)                                                          \
  namespace ns {                                                                              \
  void spmm_nn(const SparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& run); \
  void spmm_nt(const SparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& run); \
  }
FIPS_DECLARE_KERNEL_LEVEL(portable)
FIPS_DECLARE_KERNEL_LEVEL(avx2)
FIPS_DECLARE_KERNEL_LEVEL(avx512)
#undef FIPS_DECLARE_KERNEL_LEVEL

// The products at the chosen level (they throw std::runtime_error if no level could be chosen).
// Y[T, cols] = A[T, rows] @ V
void spmm_nn(const SparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& run);
// Y[T, rows] = A[T, cols] @ V^T
void spmm_nt(const SparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& run);

// The chosen level: "portable", "avx2" or "avx512" ("unavailable" when the choice failed).
const char* kernel_isa();
// nullptr when a level was chosen, else the one-line reason (e.g. a forced level the CPU lacks).
const char* kernel_select_error();
// The levels compiled into this library, comma separated (e.g. "portable,avx2,avx512").
const char* kernel_levels();
// Identity of the sources the library was built from ("fips-sparse-sources-sha256:<hex>", or
// "...:unknown"): fips_rt.runtime.native refuses a prebuilt library built from other sources.
const char* kernel_sources_id();

}  // namespace fips
