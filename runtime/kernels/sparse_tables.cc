// Mask tables and the validity rule of the attributes (see sparse_kernels.h). Compiled once, with
// the baseline flags of the target (no -m options): every kernel level uses these tables.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "sparse_kernels.h"

namespace fips {
namespace {

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
  for (; p0 + 8 <= p1; p0 += 8) n += __builtin_popcount(mask[p0 >> 3]);
  while (p0 < p1) n += bit_at(mask, p0++);                             // tail bits
  return n;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

const char* check_dims(int64_t rows, int64_t cols, int64_t* bits, int64_t* nbytes) {
  if (rows < 1 || cols < 1) return "rows and cols must be >= 1";
  int64_t n = 0;
  if (__builtin_mul_overflow(rows, cols, &n) || n > kMaxBits) return "rows * cols must be < 2**31";
  if (bits) *bits = n;
  if (nbytes) *nbytes = n / 8 + (n % 8 != 0);
  return nullptr;
}

void build_tables(const uint8_t* mask, size_t mask_bytes, int64_t rows, int64_t cols, bool with_chunks,
                  MaskTables* out) {
  int64_t bits = 0, nbytes = 0;
  if (const char* why = check_dims(rows, cols, &bits, &nbytes)) throw std::invalid_argument(why);
  if (!mask || mask_bytes != static_cast<size_t>(nbytes))
    throw std::invalid_argument("mask has " + std::to_string(mask_bytes) + " bytes, rows * cols needs " +
                                std::to_string(nbytes));
  // every size below is <= bits + 1 < 2**31 (cols >= 1): no overflow, no allocation larger
  // than 8 bytes per mask bit
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

}  // namespace fips
