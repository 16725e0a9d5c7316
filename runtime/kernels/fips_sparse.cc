// onnxruntime custom-op library: domain "fips", ops "SparseMatMul" (float32) and "QSparseMatMul"
// (int8 / int4 codes with float32 scales, float32 A; see the QSparseMatMul section below), CPU.
//
// Contract: docs/sparse-op.md. Inputs A [..., K] float, values [nnz] float, mask [nbytes]
// uint8; attributes rows, cols, transB (default 0).
//   transB = 0: K == rows, Y[..., cols] = A @ V
//   transB = 1: K == cols, Y[..., rows] = A @ V^T
// Validity (docs/sparse-op.md, "The validity rule"): the attributes (1 <= rows, cols;
// rows * cols < 2**31; transB in {0, 1}) and a constant mask / values are checked when the kernel
// is created, the actual tensors (A's rank and last dimension, mask exactly ceil(rows*cols/8)
// bytes, values == popcount, output size) at every call, all with overflow-checked arithmetic and
// before anything is allocated or written; a violation is an onnxruntime error status.
// Only float32 has a kernel. float16 nodes: registering a custom op also registers an op
// *schema* for (fips, SparseMatMul) whose type constraints are the union of the types the
// ops of that name declare, and onnxruntime then resolves the node against that schema,
// not against the model-local function (measured with onnxruntime 1.32):
//   * with a float32-only declaration, a float16 node fails at load time ("Type Error:
//     Type 'tensor(float16)' of input parameter (A) of operator (SparseMatMul) ... is
//     invalid"); the function body is never considered;
//   * so a second, schema-only declaration is added: the same op for float16, bound to an
//     execution-provider name that no provider has (kSchemaOnlyEp), i.e. no float16 kernel
//     exists anywhere. The float16 node then loads; being unclaimed, onnxruntime's
//     InsertCastTransformer wraps it in Casts and runs this float32 kernel (the float16
//     `values` initializer is cast once, at load, to a float32 initializer: 4 bytes per kept
//     entry, still no dense V). The function body is still not used in a session that has
//     this library; sessions without it (e.g. CUDA) inline the function body as before.
// FIPS_SPARSE_NO_FP16_SCHEMA=1 (read at the first registration) leaves the float16
// declaration out (float16 nodes then fail to load while the library is registered).
//
// Load it with SessionOptions.register_custom_ops_library(path) (fips_rt.runtime.native
// builds and registers it). Work is split over onnxruntime's intra-op thread pool
// (OrtApi::KernelContext_ParallelFor, API 17 = onnxruntime 1.17); with onnxruntime 1.16
// the kernel runs single-threaded, as with FIPS_SPARSE_SERIAL=1. No OpenMP, so
// session.intra_op.allow_spinning can stay at its default.
//
// Build: runtime/kernel_build.py (used by setup.py when the wheel is built, and by
// fips_rt.runtime.native in a source checkout): this file, sparse_tables.cc and
// sparse_dispatch.cc with the target's baseline flags, sparse_kernels.cc once per kernel level
// with that level's flags (-O3 -fPIC -std=c++17 -fvisibility=hidden, plus nothing / -mavx2
// -mfma -mpopcnt / -mavx512f -mavx2 -mfma -mpopcnt), linked into one libfips_sparse.so; no
// -march=native. The level is chosen at run time (sparse_dispatch.cc); a level forced through
// FIPS_SPARSE_ISA that the CPU lacks makes RegisterCustomOps return an error status.
// (FIPS_RT_CXXFLAGS appends flags, into a separate cache entry: e.g. an AddressSanitizer build
// with "-fsanitize=address -fno-omit-frame-pointer -O1 -g", loaded with libasan preloaded.)
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "ort_api_min.h"
#include "qsparse_kernels.h"
#include "sparse_kernels.h"

namespace {

// API version requested from onnxruntime: 17 for KernelContext_ParallelFor, 16 (V2 kernel
// entry points, constant-input query) is the minimum.
constexpr uint32_t kMinApi = 16;
constexpr uint32_t kParallelApi = 17;

struct Error {
  OrtErrorCode code;
  std::string msg;
};

[[noreturn]] void fail(const std::string& msg, OrtErrorCode code = ORT_INVALID_ARGUMENT) {
  throw Error{code, "fips.SparseMatMul: " + msg};
}

// Throws on a non-null status (releasing it).
void check(const OrtApi* api, OrtStatus* st) {
  if (!st) return;
  std::string msg = api->GetErrorMessage(st);
  OrtErrorCode code = api->GetErrorCode(st);
  api->ReleaseStatus(st);
  throw Error{code, "fips.SparseMatMul: onnxruntime call failed: " + msg};
}

struct TensorInfo {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
  size_t count = 0;
};

TensorInfo tensor_info(const OrtApi* api, const OrtValue* v) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(api, api->GetTensorTypeAndShape(v, &info));
  TensorInfo out;
  OrtStatus* st = api->GetTensorElementType(info, &out.type);
  size_t nd = 0;
  if (!st) st = api->GetDimensionsCount(info, &nd);
  if (!st) {
    out.dims.resize(nd);
    st = api->GetDimensions(info, out.dims.data(), nd);
  }
  if (!st) st = api->GetTensorShapeElementCount(info, &out.count);
  api->ReleaseTensorTypeAndShapeInfo(info);
  check(api, st);
  return out;
}

template <class T>
const T* tensor_data(const OrtApi* api, const OrtValue* v) {
  void* p = nullptr;
  check(api, api->GetTensorMutableData(const_cast<OrtValue*>(v), &p));
  return static_cast<const T*>(p);
}

// Runs tasks on the session's intra-op pool when the API has ParallelFor.
struct OrtTaskRunner final : fips::TaskRunner {
  const OrtApi* api;
  bool has_parallel_for;
  OrtKernelContext* ctx;
  OrtTaskRunner(const OrtApi* a, bool p, OrtKernelContext* c) : api(a), has_parallel_for(p), ctx(c) {}
  void run(size_t n, void (*fn)(void*, size_t), void* arg) const override {
    // FIPS_SPARSE_SERIAL=1: run every task on the calling thread (read once).
    static const bool serial = [] {
      const char* e = std::getenv("FIPS_SPARSE_SERIAL");
      return e && e[0] && e[0] != '0';
    }();
    if (n > 1 && has_parallel_for && !serial) {
      OrtStatus* st = api->KernelContext_ParallelFor(ctx, fn, n, 0, arg);
      if (!st) return;
      api->ReleaseStatus(st);  // not available in this build: fall through, run serially
    }
    for (size_t i = 0; i < n; ++i) fn(arg, i);
  }
};

struct SparseMatMulKernel {
  static constexpr const char* kPrefix = "fips.SparseMatMul: ";
  const OrtApi* api = nullptr;
  uint32_t api_version = 0;
  int64_t rows = 0, cols = 0, trans_b = 0;
  int64_t bits = 0, nbytes = 0;  // rows * cols and ceil(bits / 8), checked at creation
  // Tables of a constant (initializer) mask, built once when the kernel is created.
  std::unique_ptr<fips::MaskTables> const_tables;
  const uint8_t* const_mask = nullptr;

  void compute(OrtKernelContext* ctx) {
    // Everything the rule of docs/sparse-op.md says about the inputs is checked here, with
    // overflow-checked arithmetic, before anything is allocated or written.
    size_t n_in = 0;
    check(api, api->KernelContext_GetInputCount(ctx, &n_in));
    if (n_in != 3) fail("expected 3 inputs (A, values, mask), got " + std::to_string(n_in));
    const OrtValue *a_v = nullptr, *val_v = nullptr, *mask_v = nullptr;
    check(api, api->KernelContext_GetInput(ctx, 0, &a_v));
    check(api, api->KernelContext_GetInput(ctx, 1, &val_v));
    check(api, api->KernelContext_GetInput(ctx, 2, &mask_v));
    if (!a_v || !val_v || !mask_v) fail("an input is missing");
    const TensorInfo ai = tensor_info(api, a_v), vi = tensor_info(api, val_v), mi = tensor_info(api, mask_v);
    if (ai.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || vi.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      fail("A and values must be float32");
    if (mi.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) fail("mask must be uint8");
    if (ai.dims.empty()) fail("A must have at least 1 dimension");
    if (vi.dims.size() != 1) fail("values must be 1-D, got " + std::to_string(vi.dims.size()) + " dimensions");
    if (mi.dims.size() != 1) fail("mask must be 1-D, got " + std::to_string(mi.dims.size()) + " dimensions");
    const int64_t K = ai.dims.back();
    const int64_t need_k = trans_b ? cols : rows;
    if (K != need_k)
      fail("A has last dimension " + std::to_string(K) + " but the node (rows=" + std::to_string(rows) +
           ", cols=" + std::to_string(cols) + ", transB=" + std::to_string(trans_b) + ") needs " +
           std::to_string(need_k));
    if (mi.count != static_cast<size_t>(nbytes))
      fail("mask has " + std::to_string(mi.count) + " bytes, rows * cols = " + std::to_string(bits) +
           " needs exactly " + std::to_string(nbytes));
    // T = product of A's leading dims; Y has T * n_out elements
    const int64_t n_out = trans_b ? rows : cols;
    int64_t T = 1, y_count = 0;
    for (size_t i = 0; i + 1 < ai.dims.size(); ++i) {
      if (ai.dims[i] < 0) fail("A has a negative dimension");
      if (__builtin_mul_overflow(T, ai.dims[i], &T)) fail("A's leading dimensions overflow int64");
    }
    if (__builtin_mul_overflow(T, n_out, &y_count) ||
        static_cast<uint64_t>(y_count) > SIZE_MAX / sizeof(float))
      fail("the output would have more than 2**63 elements");

    const uint8_t* mask = tensor_data<uint8_t>(api, mask_v);
    // Tables: from the kernel's cache when the mask is the constant seen at creation,
    // otherwise built for this call (build_tables checks its preconditions again).
    const fips::MaskTables* tables = nullptr;
    fips::MaskTables local;
    if (const_tables && mask == const_mask) {
      tables = const_tables.get();
    } else {
      fips::build_tables(mask, mi.count, rows, cols, trans_b == 0, &local);
      tables = &local;
    }
    if (vi.count != static_cast<size_t>(tables->nnz))
      fail("values has " + std::to_string(vi.count) + " entries but the mask keeps " +
           std::to_string(tables->nnz));

    std::vector<int64_t> ydims(ai.dims);
    ydims.back() = n_out;
    OrtValue* y_v = nullptr;
    check(api, api->KernelContext_GetOutput(ctx, 0, ydims.data(), ydims.size(), &y_v));
    if (y_count == 0) return;  // empty output
    float* Y = nullptr;
    check(api, api->GetTensorMutableData(y_v, reinterpret_cast<void**>(&Y)));
    if (tables->nnz == 0) {  // V == 0
      std::memset(Y, 0, static_cast<size_t>(y_count) * sizeof(float));
      return;
    }
    const float* A = tensor_data<float>(api, a_v);
    fips::SparseMatrix V{tensor_data<float>(api, val_v), mask, mi.count, tables};
    OrtTaskRunner runner(api, api_version >= kParallelApi, ctx);
    if (trans_b) fips::spmm_nt(V, A, T, Y, runner);
    else fips::spmm_nn(V, A, T, Y, runner);
  }
};

OrtStatus* make_status(const OrtApi* api, const Error& e) { return api->CreateStatus(e.code, e.msg.c_str()); }

// ---- fips.QSparseMatMul ---------------------------------------------------------------------
// Inputs A [..., K] float32, qvalues int8 [nnz] (bits 8) / uint8 [ceil(nnz/2)] (bits 4), scales
// float32 [nscales], mask uint8 [nbytes]; attributes rows, cols, transB, bits, group_size
// (docs/sparse-op.md). The rule is checked as for SparseMatMul (attributes and constant inputs at
// creation, the actual tensors at every call, before anything is allocated or written), plus the
// codes' dtype and length (exactly nnz / ceil(nnz/2)) and the scales' (exactly rows / ceil(nnz/g)).
[[noreturn]] void qfail(const std::string& msg, OrtErrorCode code = ORT_INVALID_ARGUMENT) {
  throw Error{code, "fips.QSparseMatMul: " + msg};
}

struct QSparseMatMulKernel {
  static constexpr const char* kPrefix = "fips.QSparseMatMul: ";
  const OrtApi* api = nullptr;
  uint32_t api_version = 0;
  int64_t rows = 0, cols = 0, trans_b = 0, qbits = 0, group_size = 0;
  int64_t act_bits = 0;  // activation_bits: 0 (float A, exact) or 8 (A may be quantized to int8 per 64 entries)
  int64_t bits = 0, nbytes = 0;
  std::unique_ptr<fips::MaskTables> const_tables;
  const uint8_t* const_mask = nullptr;

  // The codes and scales must match the node's bits / group_size and the mask's nnz.
  void check_codes(const TensorInfo& qi, int64_t nnz) const {
    const auto want = qbits == 8 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    if (qi.type != want) qfail(std::string("qvalues must be ") + (qbits == 8 ? "int8" : "uint8") + " for bits=" +
                               std::to_string(qbits));
    if (qi.dims.size() != 1) qfail("qvalues must be 1-D, got " + std::to_string(qi.dims.size()) + " dimensions");
    const int64_t need = fips::quant_code_bytes(qbits, nnz);
    if (qi.count != static_cast<size_t>(need))
      qfail("qvalues has " + std::to_string(qi.count) + " entries but the mask keeps " + std::to_string(nnz) +
            ", which needs exactly " + std::to_string(need) + " at bits=" + std::to_string(qbits));
  }
  void check_scales(const TensorInfo& si, int64_t nnz) const {
    if (si.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) qfail("scales must be float32");
    if (si.dims.size() != 1) qfail("scales must be 1-D, got " + std::to_string(si.dims.size()) + " dimensions");
    const int64_t need = fips::quant_num_scales(rows, group_size, nnz);
    if (si.count != static_cast<size_t>(need))
      qfail("scales has " + std::to_string(si.count) + " entries, group_size=" + std::to_string(group_size) +
            " with " + std::to_string(nnz) + " kept entries needs exactly " + std::to_string(need));
  }

  void compute(OrtKernelContext* ctx) {
    size_t n_in = 0;
    check(api, api->KernelContext_GetInputCount(ctx, &n_in));
    if (n_in != 4) qfail("expected 4 inputs (A, qvalues, scales, mask), got " + std::to_string(n_in));
    const OrtValue *a_v = nullptr, *q_v = nullptr, *s_v = nullptr, *mask_v = nullptr;
    check(api, api->KernelContext_GetInput(ctx, 0, &a_v));
    check(api, api->KernelContext_GetInput(ctx, 1, &q_v));
    check(api, api->KernelContext_GetInput(ctx, 2, &s_v));
    check(api, api->KernelContext_GetInput(ctx, 3, &mask_v));
    if (!a_v || !q_v || !s_v || !mask_v) qfail("an input is missing");
    const TensorInfo ai = tensor_info(api, a_v), qi = tensor_info(api, q_v), si = tensor_info(api, s_v),
                     mi = tensor_info(api, mask_v);
    if (ai.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) qfail("A must be float32");
    if (mi.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) qfail("mask must be uint8");
    if (ai.dims.empty()) qfail("A must have at least 1 dimension");
    if (mi.dims.size() != 1) qfail("mask must be 1-D, got " + std::to_string(mi.dims.size()) + " dimensions");
    const int64_t K = ai.dims.back();
    const int64_t need_k = trans_b ? cols : rows;
    if (K != need_k)
      qfail("A has last dimension " + std::to_string(K) + " but the node (rows=" + std::to_string(rows) +
            ", cols=" + std::to_string(cols) + ", transB=" + std::to_string(trans_b) + ") needs " +
            std::to_string(need_k));
    if (mi.count != static_cast<size_t>(nbytes))
      qfail("mask has " + std::to_string(mi.count) + " bytes, rows * cols = " + std::to_string(bits) +
            " needs exactly " + std::to_string(nbytes));
    const int64_t n_out = trans_b ? rows : cols;
    int64_t T = 1, y_count = 0;
    for (size_t i = 0; i + 1 < ai.dims.size(); ++i) {
      if (ai.dims[i] < 0) qfail("A has a negative dimension");
      if (__builtin_mul_overflow(T, ai.dims[i], &T)) qfail("A's leading dimensions overflow int64");
    }
    if (__builtin_mul_overflow(T, n_out, &y_count) || static_cast<uint64_t>(y_count) > SIZE_MAX / sizeof(float))
      qfail("the output would have more than 2**63 elements");
    const uint8_t* mask = tensor_data<uint8_t>(api, mask_v);
    const fips::MaskTables* tables = nullptr;
    fips::MaskTables local;
    if (const_tables && mask == const_mask) {
      tables = const_tables.get();
    } else {
      fips::build_tables(mask, mi.count, rows, cols, trans_b == 0, &local);
      tables = &local;
    }
    check_codes(qi, tables->nnz);
    check_scales(si, tables->nnz);

    std::vector<int64_t> ydims(ai.dims);
    ydims.back() = n_out;
    OrtValue* y_v = nullptr;
    check(api, api->KernelContext_GetOutput(ctx, 0, ydims.data(), ydims.size(), &y_v));
    if (y_count == 0) return;
    float* Y = nullptr;
    check(api, api->GetTensorMutableData(y_v, reinterpret_cast<void**>(&Y)));
    if (tables->nnz == 0) {
      std::memset(Y, 0, static_cast<size_t>(y_count) * sizeof(float));
      return;
    }
    const float* A = tensor_data<float>(api, a_v);
    fips::QSparseMatrix Q{tensor_data<uint8_t>(api, q_v), static_cast<int>(qbits), static_cast<int64_t>(qi.count),
                          tensor_data<float>(api, s_v), group_size, static_cast<int64_t>(si.count), mask, mi.count,
                          tables, static_cast<int>(act_bits)};
    OrtTaskRunner runner(api, api_version >= kParallelApi, ctx);
    // FIPS_QSPARSE_FUSED_MAX_T=N (read once): the largest T for the fused kernels (default kQFusedMaxT)
    static const int64_t fused_max_t = [] {
      const char* e = std::getenv("FIPS_QSPARSE_FUSED_MAX_T");
      return e && e[0] ? std::strtoll(e, nullptr, 10) : int64_t(-1);
    }();
    const int64_t max_t = fused_max_t >= 0 ? fused_max_t
                                           : (qbits == 8 && group_size == 0 ? fips::kQFusedMaxTInt8Row : fips::kQFusedMaxT);
    if (T <= max_t) {
      if (trans_b) fips::qspmm_nt(Q, A, T, Y, runner);
      else fips::qspmm_nn(Q, A, T, Y, runner);
      return;
    }
    // many tokens: the kept values dequantized once (float32 [nnz], not a dense V), then the fp32 kernels
    std::unique_ptr<float[]> vals(new float[static_cast<size_t>(tables->nnz)]);
    fips::qdequantize(Q, vals.get(), runner);
    fips::SparseMatrix V{vals.get(), mask, mi.count, tables};
    if (trans_b) fips::spmm_nt(V, A, T, Y, runner);
    else fips::spmm_nn(V, A, T, Y, runner);
  }
};

int64_t attr_int(const OrtApi* api, const OrtKernelInfo* info, const char* name, bool required,
                 int64_t dflt) {
  int64_t v = 0;
  OrtStatus* st = api->KernelInfoGetAttribute_int64(info, name, &v);
  if (!st) return v;
  std::string msg = api->GetErrorMessage(st);
  api->ReleaseStatus(st);
  // absent: the default; present with another type (e.g. a float transB): refused
  const bool absent = msg.find("No attribute") != std::string::npos;
  if (required || !absent) fail(std::string("missing or invalid int attribute '") + name + "': " + msg);
  return dflt;
}

// ---- OrtCustomOp callbacks ---------------------------------------------------------------
uint32_t g_api_version = 0;  // version of the OrtApi table the op was registered with

OrtStatus* create_kernel_v2(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  *out = nullptr;
  try {
    auto k = std::make_unique<SparseMatMulKernel>();
    k->api = api;
    k->api_version = g_api_version;
    k->rows = attr_int(api, info, "rows", true, 0);
    k->cols = attr_int(api, info, "cols", true, 0);
    k->trans_b = attr_int(api, info, "transB", false, 0);
    if (const char* why = fips::check_dims(k->rows, k->cols, &k->bits, &k->nbytes))
      fail(std::string(why) + " (rows=" + std::to_string(k->rows) + ", cols=" + std::to_string(k->cols) + ")");
    if (k->trans_b != 0 && k->trans_b != 1) fail("transB must be 0 or 1, got " + std::to_string(k->trans_b));
    // Mask given as an initializer: check it and build its popcount tables once, here; an
    // invalid constant mask (or constant values that do not match it) refuses the node now.
    int is_const = 0;
    const OrtValue* mask_v = nullptr;
    OrtStatus* st = api->KernelInfoGetConstantInput_tensor(info, 2, &is_const, &mask_v);
    if (st) {
      api->ReleaseStatus(st);
    } else if (is_const && mask_v) {
      const TensorInfo mi = tensor_info(api, mask_v);
      if (mi.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) fail("mask must be uint8");
      if (mi.dims.size() != 1) fail("mask must be 1-D, got " + std::to_string(mi.dims.size()) + " dimensions");
      if (mi.count != static_cast<size_t>(k->nbytes))
        fail("mask has " + std::to_string(mi.count) + " bytes, rows * cols = " + std::to_string(k->bits) +
             " needs exactly " + std::to_string(k->nbytes));
      k->const_mask = tensor_data<uint8_t>(api, mask_v);
      k->const_tables = std::make_unique<fips::MaskTables>();
      fips::build_tables(k->const_mask, mi.count, k->rows, k->cols, k->trans_b == 0, k->const_tables.get());
      // constant values too: their count must be the mask's popcount
      int v_const = 0;
      const OrtValue* val_v = nullptr;
      OrtStatus* st2 = api->KernelInfoGetConstantInput_tensor(info, 1, &v_const, &val_v);
      if (st2) {
        api->ReleaseStatus(st2);
      } else if (v_const && val_v) {
        const TensorInfo vi = tensor_info(api, val_v);
        if (vi.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) fail("values must be float32");
        if (vi.dims.size() != 1)
          fail("values must be 1-D, got " + std::to_string(vi.dims.size()) + " dimensions");
        if (vi.count != static_cast<size_t>(k->const_tables->nnz))
          fail("values has " + std::to_string(vi.count) + " entries but the mask keeps " +
               std::to_string(k->const_tables->nnz));
      }
    }
    *out = k.release();
    return nullptr;
  } catch (const Error& e) {
    return make_status(api, e);
  } catch (const std::bad_alloc&) {
    return api->CreateStatus(ORT_FAIL, "fips.SparseMatMul: out of memory");
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, (std::string("fips.SparseMatMul: ") + e.what()).c_str());
  }
}

// fips.QSparseMatMul callbacks.
int64_t attr_int_q(const OrtApi* api, const OrtKernelInfo* info, const char* name, bool required, int64_t dflt) {
  try {
    return attr_int(api, info, name, required, dflt);
  } catch (const Error& e) {
    qfail(e.msg.substr(std::string("fips.SparseMatMul: ").size()));
  }
}

OrtStatus* qcreate_kernel_v2(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  *out = nullptr;
  try {
    auto k = std::make_unique<QSparseMatMulKernel>();
    k->api = api;
    k->api_version = g_api_version;
    k->rows = attr_int_q(api, info, "rows", true, 0);
    k->cols = attr_int_q(api, info, "cols", true, 0);
    k->trans_b = attr_int_q(api, info, "transB", false, 0);
    k->qbits = attr_int_q(api, info, "bits", true, 0);
    k->group_size = attr_int_q(api, info, "group_size", true, 0);
    k->act_bits = attr_int_q(api, info, "activation_bits", false, 0);
    if (const char* why = fips::check_dims(k->rows, k->cols, &k->bits, &k->nbytes))
      qfail(std::string(why) + " (rows=" + std::to_string(k->rows) + ", cols=" + std::to_string(k->cols) + ")");
    if (k->trans_b != 0 && k->trans_b != 1) qfail("transB must be 0 or 1, got " + std::to_string(k->trans_b));
    if (const char* why = fips::check_quant_attrs(k->qbits, k->group_size))
      qfail(std::string(why) + " (bits=" + std::to_string(k->qbits) + ", group_size=" + std::to_string(k->group_size) +
            ")");
    if (k->act_bits != 0 && k->act_bits != 8)
      qfail("activation_bits must be 0 or 8, got " + std::to_string(k->act_bits));
    int is_const = 0;
    const OrtValue* mask_v = nullptr;
    OrtStatus* st = api->KernelInfoGetConstantInput_tensor(info, 3, &is_const, &mask_v);
    if (st) {
      api->ReleaseStatus(st);
    } else if (is_const && mask_v) {
      const TensorInfo mi = tensor_info(api, mask_v);
      if (mi.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) qfail("mask must be uint8");
      if (mi.dims.size() != 1) qfail("mask must be 1-D, got " + std::to_string(mi.dims.size()) + " dimensions");
      if (mi.count != static_cast<size_t>(k->nbytes))
        qfail("mask has " + std::to_string(mi.count) + " bytes, rows * cols = " + std::to_string(k->bits) +
              " needs exactly " + std::to_string(k->nbytes));
      k->const_mask = tensor_data<uint8_t>(api, mask_v);
      k->const_tables = std::make_unique<fips::MaskTables>();
      fips::build_tables(k->const_mask, mi.count, k->rows, k->cols, k->trans_b == 0, k->const_tables.get());
      for (size_t idx : {size_t(1), size_t(2)}) {  // constant codes / scales: checked against the mask now
        int c = 0;
        const OrtValue* v = nullptr;
        OrtStatus* st2 = api->KernelInfoGetConstantInput_tensor(info, idx, &c, &v);
        if (st2) {
          api->ReleaseStatus(st2);
        } else if (c && v) {
          const TensorInfo ti = tensor_info(api, v);
          if (idx == 1) k->check_codes(ti, k->const_tables->nnz);
          else k->check_scales(ti, k->const_tables->nnz);
        }
      }
    }
    *out = k.release();
    return nullptr;
  } catch (const Error& e) {
    return make_status(api, e);
  } catch (const std::bad_alloc&) {
    return api->CreateStatus(ORT_FAIL, "fips.QSparseMatMul: out of memory");
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, (std::string("fips.QSparseMatMul: ") + e.what()).c_str());
  }
}

// ---- One table of the ops this library registers ---------------------------------------------
// Each entry: the op's name, inputs and their declared types, output type, execution provider and
// kernel entry points. The OrtCustomOp callbacks find their entry through the FipsOp that holds the
// OrtCustomOp as its first member.
template <class K>
OrtStatus* compute_v2(void* kernel, OrtKernelContext* ctx) {
  auto* k = static_cast<K*>(kernel);
  try {
    k->compute(ctx);
    return nullptr;
  } catch (const Error& e) {
    return make_status(k->api, e);
  } catch (const std::bad_alloc&) {
    return k->api->CreateStatus(ORT_FAIL, (std::string(K::kPrefix) + "out of memory").c_str());
  } catch (const std::exception& e) {
    return k->api->CreateStatus(ORT_FAIL, (std::string(K::kPrefix) + e.what()).c_str());
  }
}
template <class K>
void destroy_kernel(void* kernel) {
  delete static_cast<K*>(kernel);
}

using CreateFn = OrtStatus* (*)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void**);
struct OpSpec {
  const char* name;
  const char* ep;                               // execution provider the kernel is bound to
  ONNXTensorElementDataType inputs[4];          // UNDEFINED: any type (checked by the kernel)
  size_t n_inputs;
  ONNXTensorElementDataType output;
  CreateFn create;                              // nullptr never (schema-only ops share their twin's)
  OrtStatus* (*compute)(void*, OrtKernelContext*);
  void (*destroy)(void*);
};

// Schema-only float16 declaration (see the file comment): its "kernel" is bound to an
// execution provider that does not exist, so it is never instantiated.
constexpr const char* kSchemaOnlyEp = "FipsSchemaOnlyNoSuchExecutionProvider";
constexpr auto kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, kF16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
               kU8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, kAny = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
enum : size_t { kOpSparse, kOpQSparse, kOpSparseFp16, kNumOps };
const OpSpec kOps[kNumOps] = {
    // fips.SparseMatMul: A, values float32, mask uint8
    {"SparseMatMul", "CPUExecutionProvider", {kF32, kF32, kU8}, 3, kF32, create_kernel_v2,
     compute_v2<SparseMatMulKernel>, destroy_kernel<SparseMatMulKernel>},
    // fips.QSparseMatMul: A float32, qvalues int8 / uint8 (as bits says), scales float32, mask uint8
    {"QSparseMatMul", "CPUExecutionProvider", {kF32, kAny, kF32, kU8}, 4, kF32, qcreate_kernel_v2,
     compute_v2<QSparseMatMulKernel>, destroy_kernel<QSparseMatMulKernel>},
    // float16 fips.SparseMatMul: schema only (FIPS_SPARSE_NO_FP16_SCHEMA=1 leaves it out)
    {"SparseMatMul", kSchemaOnlyEp, {kF16, kF16, kU8}, 3, kF16, create_kernel_v2, compute_v2<SparseMatMulKernel>,
     destroy_kernel<SparseMatMulKernel>},
};

struct FipsOp {
  OrtCustomOp op;  // first member: a const OrtCustomOp* of this op points at its FipsOp
  const OpSpec* spec;
};
const OpSpec& spec_of(const OrtCustomOp* op) { return *reinterpret_cast<const FipsOp*>(op)->spec; }

const char* op_name(const OrtCustomOp* op) { return spec_of(op).name; }
const char* op_ep(const OrtCustomOp* op) { return spec_of(op).ep; }
ONNXTensorElementDataType op_input_type(const OrtCustomOp* op, size_t i) {
  return i < spec_of(op).n_inputs ? spec_of(op).inputs[i] : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}
size_t op_input_count(const OrtCustomOp* op) { return spec_of(op).n_inputs; }
ONNXTensorElementDataType op_output_type(const OrtCustomOp* op, size_t) { return spec_of(op).output; }
size_t op_output_count(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic op_required(const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; }
OrtMemType op_input_mem(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int op_min_arity(const OrtCustomOp*) { return 1; }
int op_homogeneous(const OrtCustomOp*) { return 1; }
int op_start_version(const OrtCustomOp*) { return 1; }

void make_op(uint32_t version, const OpSpec* spec, FipsOp* out) {
  OrtCustomOp& op = out->op;
  std::memset(&op, 0, sizeof(op));  // fields past `version` stay null
  out->spec = spec;
  op.version = version;
  op.CreateKernel = nullptr;  // V2 entry points are used (version >= 16)
  op.GetName = op_name;
  op.GetExecutionProviderType = op_ep;
  op.GetInputType = op_input_type;
  op.GetInputTypeCount = op_input_count;
  op.GetOutputType = op_output_type;
  op.GetOutputTypeCount = op_output_count;
  op.KernelCompute = nullptr;
  op.KernelDestroy = spec->destroy;
  op.GetInputCharacteristic = op_required;
  op.GetOutputCharacteristic = op_required;
  op.GetInputMemoryType = op_input_mem;
  op.GetVariadicInputMinArity = op_min_arity;
  op.GetVariadicInputHomogeneity = op_homogeneous;
  op.GetVariadicOutputMinArity = op_min_arity;
  op.GetVariadicOutputHomogeneity = op_homogeneous;
  op.CreateKernelV2 = spec->create;
  op.KernelComputeV2 = spec->compute;
  if (version >= 17) {
    op.InferOutputShapeFn = nullptr;  // onnxruntime infers the output type from the kernel def
    op.GetStartVersion = op_start_version;
    op.GetEndVersion = nullptr;
  }
}

FipsOp g_ops[kNumOps];                  // the table's ops, made at the first registration
OrtCustomOpDomain* g_domain = nullptr;  // shared by all sessions, lives until process exit
std::mutex g_mutex;

// "1.17.3" -> 17 (onnxruntime 1.N serves C API versions 1..N); 0 if unparsable.
uint32_t ort_minor(const char* version) {
  if (!version) return 0;
  unsigned major = 0, minor = 0;
  if (std::sscanf(version, "%u.%u", &major, &minor) != 2) return 0;
  if (major != 1) return 1000;  // a future 2.x: assume everything we use is there
  return minor;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                                const OrtApiBase* api_base) {
  if (!api_base || !api_base->GetApi) return nullptr;  // cannot even report an error
  const char* ver = api_base->GetVersionString ? api_base->GetVersionString() : nullptr;
  const uint32_t minor = ort_minor(ver);
  uint32_t want = minor >= kParallelApi ? kParallelApi : kMinApi;
  const OrtApi* api = minor >= kMinApi ? api_base->GetApi(want) : nullptr;
  if (!api) {
    // Report through the oldest table, which every onnxruntime serves.
    const OrtApi* v1 = api_base->GetApi(1);
    std::string msg = "fips_sparse: onnxruntime " + std::string(ver ? ver : "(unknown)") +
                      " does not provide C API version " + std::to_string(want) +
                      "; the fips.SparseMatMul kernel library needs onnxruntime >= 1.16";
    if (v1) return v1->CreateStatus(ORT_FAIL, msg.c_str());
    std::fprintf(stderr, "%s\n", msg.c_str());
    return nullptr;
  }
  // The kernel level (chosen once, from the CPU and FIPS_SPARSE_ISA / FIPS_SPARSE_FORCE_SCALAR):
  // a forced level this CPU lacks refuses the registration, in one line.
  if (const char* why = fips::kernel_select_error())
    return api->CreateStatus(ORT_FAIL, (std::string("fips_sparse: ") + why).c_str());
  try {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!g_domain) {
      g_api_version = want;
      OrtCustomOpDomain* domain = nullptr;
      check(api, api->CreateCustomOpDomain("fips", &domain));
      for (size_t i = 0; i < kNumOps; ++i) {
        // FIPS_SPARSE_NO_FP16_SCHEMA: escape hatch, for tests/debugging
        if (i == kOpSparseFp16 && std::getenv("FIPS_SPARSE_NO_FP16_SCHEMA")) continue;
        make_op(want, &kOps[i], &g_ops[i]);
        check(api, api->CustomOpDomain_Add(domain, &g_ops[i].op));
      }
      g_domain = domain;
    }
    check(api, api->AddCustomOpDomain(options, g_domain));
    return nullptr;
  } catch (const Error& e) {
    return make_status(api, e);
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, (std::string("fips_sparse: ") + e.what()).c_str());
  }
}

// Diagnostics for tests / benchmarks (ctypes): the kernel level in use ("portable", "avx2",
// "avx512"; "unavailable" when the forced one cannot run), the levels compiled in, the reason a
// forced level cannot run (nullptr if it can), and the identity of the sources it was built from.
extern "C" __attribute__((visibility("default"))) const char* FipsSparseKernelIsa() { return fips::kernel_isa(); }
extern "C" __attribute__((visibility("default"))) const char* FipsSparseKernelLevels() { return fips::kernel_levels(); }
extern "C" __attribute__((visibility("default"))) const char* FipsSparseKernelError() {
  return fips::kernel_select_error();
}
extern "C" __attribute__((visibility("default"))) const char* FipsSparseSourcesId() { return fips::kernel_sources_id(); }
