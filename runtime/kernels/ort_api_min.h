// Minimal, self-written declarations of the parts of the onnxruntime C API that
// fips_sparse.cc uses.
//
// The onnxruntime Python wheels ship no C headers, so this file declares only what
// the kernel library needs. The C API is a stable, versioned ABI:
//   * OrtGetApiBase() (here: the OrtApiBase* handed to RegisterCustomOps) has two
//     entries, GetApi(version) and GetVersionString().
//   * GetApi(N) returns a table of function pointers (OrtApi). Entries are only ever
//     appended; entry i has the same meaning in every version >= the one that added it.
//     Only the entries used here are named; the others are opaque padding slots. The
//     index of every named entry is checked with a static_assert below (indices read
//     from the public onnxruntime_c_api.h / the "End of Version N" markers of the
//     implementation's table: v1 ends at index 101, v15 at 254, v16 at 265, v17 at 275).
//   * OrtCustomOp is a struct of callbacks that grew over versions; onnxruntime >= 1.16
//     reads GetInputCharacteristic/GetOutputCharacteristic/GetInputMemoryType (and the
//     V2 kernel entry points) so the struct is declared with ALL fields up to the v20
//     layout; the library fills in everything up to the version it declares and leaves
//     the rest null.
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {

struct OrtStatus;
struct OrtValue;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtTensorTypeAndShapeInfo;
struct OrtShapeInferContext;
struct OrtApi;

// Subset of ONNXTensorElementDataType (values follow onnx TensorProto.DataType).
enum ONNXTensorElementDataType {
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED = 0,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 = 2,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 = 3,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 = 10,
};

enum OrtErrorCode {
  ORT_OK = 0,
  ORT_FAIL = 1,
  ORT_INVALID_ARGUMENT = 2,
  ORT_NO_SUCHFILE = 3,
  ORT_NO_MODEL = 4,
  ORT_ENGINE_ERROR = 5,
  ORT_RUNTIME_EXCEPTION = 6,
  ORT_INVALID_PROTOBUF = 7,
  ORT_MODEL_LOADED = 8,
  ORT_NOT_IMPLEMENTED = 9,
  ORT_INVALID_GRAPH = 10,
  ORT_EP_FAIL = 11,
};

enum OrtMemType {
  OrtMemTypeCPUInput = -2,
  OrtMemTypeCPUOutput = -1,
  OrtMemTypeDefault = 0,
};

enum OrtCustomOpInputOutputCharacteristic {
  INPUT_OUTPUT_REQUIRED = 0,
  INPUT_OUTPUT_OPTIONAL = 1,
  INPUT_OUTPUT_VARIADIC = 2,
};

struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

// ---- the OrtApi function table (only the used entries are typed) -------------------
// Slot index of each used entry; a padding array fills the gaps between them.
#define FIPS_ORT_PAD(from, to) void* _pad_##from##_##to[(to) - (from)]

struct OrtApi {
  OrtStatus* (*CreateStatus)(OrtErrorCode code, const char* msg);                   // 0
  OrtErrorCode (*GetErrorCode)(const OrtStatus* status);                            // 1
  const char* (*GetErrorMessage)(const OrtStatus* status);                          // 2
  FIPS_ORT_PAD(3, 26);
  OrtStatus* (*CreateCustomOpDomain)(const char* domain, OrtCustomOpDomain** out);  // 26
  OrtStatus* (*CustomOpDomain_Add)(OrtCustomOpDomain* domain, const struct OrtCustomOp* op);  // 27
  OrtStatus* (*AddCustomOpDomain)(OrtSessionOptions* options, OrtCustomOpDomain* domain);     // 28
  FIPS_ORT_PAD(29, 51);
  OrtStatus* (*GetTensorMutableData)(OrtValue* value, void** out);                  // 51
  FIPS_ORT_PAD(52, 60);
  OrtStatus* (*GetTensorElementType)(const OrtTensorTypeAndShapeInfo* info,
                                     ONNXTensorElementDataType* out);               // 60
  OrtStatus* (*GetDimensionsCount)(const OrtTensorTypeAndShapeInfo* info, size_t* out);  // 61
  OrtStatus* (*GetDimensions)(const OrtTensorTypeAndShapeInfo* info, int64_t* dims,
                              size_t dims_len);                                     // 62
  FIPS_ORT_PAD(63, 64);
  OrtStatus* (*GetTensorShapeElementCount)(const OrtTensorTypeAndShapeInfo* info,
                                           size_t* out);                            // 64
  OrtStatus* (*GetTensorTypeAndShape)(const OrtValue* value,
                                      OrtTensorTypeAndShapeInfo** out);             // 65
  FIPS_ORT_PAD(66, 86);
  OrtStatus* (*KernelInfoGetAttribute_int64)(const OrtKernelInfo* info, const char* name,
                                             int64_t* out);                         // 86
  FIPS_ORT_PAD(87, 88);
  OrtStatus* (*KernelContext_GetInputCount)(const OrtKernelContext* ctx, size_t* out);  // 88
  FIPS_ORT_PAD(89, 90);
  OrtStatus* (*KernelContext_GetInput)(const OrtKernelContext* ctx, size_t index,
                                       const OrtValue** out);                       // 90
  OrtStatus* (*KernelContext_GetOutput)(OrtKernelContext* ctx, size_t index,
                                        const int64_t* dims, size_t dims_count,
                                        OrtValue** out);                            // 91
  FIPS_ORT_PAD(92, 93);
  void (*ReleaseStatus)(OrtStatus* status);                                         // 93
  FIPS_ORT_PAD(94, 99);
  void (*ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo* info);           // 99
  FIPS_ORT_PAD(100, 249);
  // API version 15 (onnxruntime 1.15)
  OrtStatus* (*KernelInfoGetConstantInput_tensor)(const OrtKernelInfo* info, size_t index,
                                                  int* is_constant,
                                                  const OrtValue** out);            // 249
  FIPS_ORT_PAD(250, 274);
  // API version 17 (onnxruntime 1.17): run fn(usr_data, i) for i in [0, total) on the
  // session's intra-op thread pool (num_batch == 0: one task per index).
  OrtStatus* (*KernelContext_ParallelFor)(const OrtKernelContext* ctx,
                                          void (*fn)(void*, size_t), size_t total,
                                          size_t num_batch, void* usr_data);        // 274
};
#undef FIPS_ORT_PAD

#define FIPS_ORT_SLOT(name) (offsetof(OrtApi, name) / sizeof(void*))
static_assert(FIPS_ORT_SLOT(GetErrorMessage) == 2, "OrtApi layout");
static_assert(FIPS_ORT_SLOT(CreateCustomOpDomain) == 26, "OrtApi layout");
static_assert(FIPS_ORT_SLOT(AddCustomOpDomain) == 28, "OrtApi layout");
static_assert(FIPS_ORT_SLOT(GetTensorMutableData) == 51, "OrtApi layout");
static_assert(FIPS_ORT_SLOT(GetTensorElementType) == 60, "OrtApi layout");
static_assert(FIPS_ORT_SLOT(GetTensorShapeElementCount) == 64, "OrtApi layout");
static_assert(FIPS_ORT_SLOT(GetTensorTypeAndShape) == 65, "OrtApi layout");
static_assert(FIPS_ORT_SLOT(KernelInfoGetAttribute_int64) == 86, "OrtApi layout");
static_assert(FIPS_ORT_SLOT(KernelContext_GetInputCount) == 88, "OrtApi layout");
static_assert(FIPS_ORT_SLOT(KernelContext_GetInput) == 90, "OrtApi layout");
static_assert(FIPS_ORT_SLOT(KernelContext_GetOutput) == 91, "OrtApi layout");
static_assert(FIPS_ORT_SLOT(ReleaseStatus) == 93, "OrtApi layout");
static_assert(FIPS_ORT_SLOT(ReleaseTensorTypeAndShapeInfo) == 99, "OrtApi layout");
static_assert(FIPS_ORT_SLOT(KernelInfoGetConstantInput_tensor) == 249, "OrtApi layout");
static_assert(FIPS_ORT_SLOT(KernelContext_ParallelFor) == 274, "OrtApi layout");
#undef FIPS_ORT_SLOT

// ---- OrtCustomOp: callbacks describing one custom operator --------------------------
struct OrtCustomOp {
  uint32_t version;  // API version the struct is filled for; fields past it are not read
  // v1
  void* (*CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetInputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp* op);
  void (*KernelCompute)(void* kernel, OrtKernelContext* ctx);
  void (*KernelDestroy)(void* kernel);
  // v8
  OrtCustomOpInputOutputCharacteristic (*GetInputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtCustomOpInputOutputCharacteristic (*GetOutputCharacteristic)(const OrtCustomOp* op, size_t index);
  // v13
  OrtMemType (*GetInputMemoryType)(const OrtCustomOp* op, size_t index);
  // v14
  int (*GetVariadicInputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp* op);
  // v16
  OrtStatus* (*CreateKernelV2)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                               void** kernel);
  OrtStatus* (*KernelComputeV2)(void* kernel, OrtKernelContext* ctx);
  // v17
  OrtStatus* (*InferOutputShapeFn)(const OrtCustomOp* op, OrtShapeInferContext* ctx);
  int (*GetStartVersion)(const OrtCustomOp* op);
  int (*GetEndVersion)(const OrtCustomOp* op);
  // v18
  size_t (*GetMayInplace)(int** input_index, int** output_index);
  void (*ReleaseMayInplace)(int* input_index, int* output_index);
  // v20
  size_t (*GetAliasMap)(int** input_index, int** output_index);
  void (*ReleaseAliasMap)(int* input_index, int* output_index);
};

}  // extern "C"
