// fips.QSparseMatMul: products of a quantized sparse V (docs/sparse-op.md) with a dense A, CPU.
//
// V [rows, cols] has the mask and the tables of fips.SparseMatMul (sparse_kernels.h); its kept
// entries are integer codes with float32 scales:
//   bits 8: codes int8 [nnz];  bits 4: uint8 [ceil(nnz/2)], entry k in the low (k even) / high
//           (k odd) nibble of byte k >> 1, signed two's complement 4-bit
//   group_size 0: one scale per row of V (scales [rows]); g > 0: one scale per g consecutive kept
//           entries in flat order (scales [ceil(nnz / g)])
//   value of entry k = code[k] * scale(group of k)
// Nothing builds a dense V. Few tokens (decode, T <= kQFusedMaxT / kQFusedMaxTInt8Row): the codes are decoded on the fly
// in the mask walk (one mask step = 8 (AVX2) or 16 (AVX-512F) columns: decode popcount(m) codes,
// convert to float, times the group's scales, expand to the lanes of the set bits); with per-row
// scales the scale is folded into A[t, r] (transB = 0) or into the row's dot product (transB = 1),
// so a step costs the fp32 kernel's work plus the decode, on a quarter (int8) or an eighth (int4) of
// the value bytes. (int8 per-row codes with cols % 64 == 0 on a CPU with AVX-512 VBMI2 + BW: 64-column
// steps with one vpexpandb expand-load, chosen at run time inside the AVX-512 level.) Many tokens (prefill): the kept values are dequantized once per call into a
// float32 [nnz] scratch (the sparse values, not a dense V: 4 bytes per kept entry, freed after the
// call) and the fp32 SparseMatMul kernels run on it (their cost is per token, the decode's per call).
#pragma once

#include <cstddef>
#include <cstdint>

#include "sparse_kernels.h"

namespace fips {

// Token counts up to these run the fused (decode-on-the-fly) kernels; above them the dequantize +
// fp32 kernel path (measured on SmolLM2 V shapes, one thread, T = 16: int8 per-row fused 1.5x faster
// than dequantize + fp32, int4 g=32 fused 2x slower). FIPS_QSPARSE_FUSED_MAX_T=N overrides both.
constexpr int64_t kQFusedMaxT = 8;          // int4, and int8 with grouped scales
constexpr int64_t kQFusedMaxTInt8Row = 16;  // int8 with per-row scales
// activation_bits = 8 kernels: 64-column steps (non-empty rows x cols / 64 x tokens) per task at least
// (smaller calls: fewer tasks). Their cost is per step (one vpexpandb + one vpdpbusd per row and 64
// columns, whatever the row's density), not per kept entry: a SmolLM2 V (576 x 1536) is 13,824 steps at
// T = 1, ~25 us on one core, so 4 tasks; a sparse down_proj V gets as many as a dense one.
constexpr int64_t kAct8TaskSteps = 3072;

struct QSparseMatrix {
  const uint8_t* codes;  // int8 [nnz] (bits 8) or packed uint8 [ceil(nnz / 2)] (bits 4)
  int bits;              // 4 or 8
  int64_t code_bytes;    // nnz (bits 8) or ceil(nnz / 2) (bits 4)
  const float* scales;   // [nscales]
  int64_t group_size;    // 0: per row; g > 0: per g kept entries
  int64_t nscales;       // rows (group_size 0) or ceil(nnz / g)
  const uint8_t* mask;
  size_t mask_bytes;
  const MaskTables* t;
  int act_bits = 0;      // 0: float activations (exact); 8: A may be quantized to int8 (activation_bits)
};

// The QSparseMatMul rule beyond SparseMatMul's (docs/sparse-op.md): nullptr when bits and
// group_size are valid, else a static message.
const char* check_quant_attrs(int64_t bits, int64_t group_size);
// Code bytes and scales a valid node with nnz kept entries must have (no overflow: nnz < 2**31).
int64_t quant_code_bytes(int64_t bits, int64_t nnz);
int64_t quant_num_scales(int64_t rows, int64_t group_size, int64_t nnz);

#define FIPS_DECLARE_QKERNEL_LEVEL(ns)                                                              \
  namespace ns {                                                                                    \
  void qspmm_nn(const QSparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& run); \
  void qspmm_nt(const QSparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& run); \
  void qdequantize(const QSparseMatrix& V, float* out, const TaskRunner& run);                      \
  }
FIPS_DECLARE_QKERNEL_LEVEL(portable)
FIPS_DECLARE_QKERNEL_LEVEL(avx2)
FIPS_DECLARE_QKERNEL_LEVEL(avx512)
#undef FIPS_DECLARE_QKERNEL_LEVEL

// At the chosen level (sparse_dispatch.cc). The fused few-token products, any T (the op uses them
// for T <= kQFusedMaxT):
// Y[T, cols] = A[T, rows] @ V
void qspmm_nn(const QSparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& run);
// Y[T, rows] = A[T, cols] @ V^T
void qspmm_nt(const QSparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& run);
// out[k] = code[k] * scale(k), k < nnz (the prefill path's scratch)
void qdequantize(const QSparseMatrix& V, float* out, const TaskRunner& run);

}  // namespace fips
