// Run-time choice of the kernel level (see "Kernel levels" in sparse_kernels.h).
//
// Compiled with the target's baseline flags, like everything but the per-level compilations of
// sparse_kernels.cc: this file only reads the CPU's features (__builtin_cpu_supports) and the
// environment, then forwards each product to the chosen level's namespace. The choice is made
// once, the first time it is needed (at the library's first registration), and kept.
//
// Build defines: FIPS_KERNEL_X86_LEVELS=1 when the avx2 and avx512 levels are linked in (x86-64
// builds); FIPS_SOURCES_SHA256="<hex>" (the sources' hash, runtime/kernel_build.py).
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "qsparse_kernels.h"
#include "sparse_kernels.h"

#ifndef FIPS_SOURCES_SHA256
#define FIPS_SOURCES_SHA256 "unknown"
#endif

namespace fips {
namespace {

constexpr int kPortable = 0, kAvx2 = 1, kAvx512 = 2;
constexpr const char* kLevelNames[] = {"portable", "avx2", "avx512"};

#if defined(FIPS_KERNEL_X86_LEVELS) && (defined(__x86_64__) || defined(__i386__))
#define FIPS_X86_LEVELS 1
constexpr int kTopLevel = kAvx512;
#else
#define FIPS_X86_LEVELS 0
constexpr int kTopLevel = kPortable;
#endif

const char kSourcesId[] = "fips-sparse-sources-sha256:" FIPS_SOURCES_SHA256;

bool env_flag(const char* name) {
  const char* e = std::getenv(name);
  return e && e[0] && std::strcmp(e, "0") != 0;
}

// FIPS_SPARSE_TEST_CPU_LACKS (tests only): a comma list of features to treat as absent.
bool pretend_lacks(const char* feature) {
  const char* e = std::getenv("FIPS_SPARSE_TEST_CPU_LACKS");
  if (!e) return false;
  const std::string list = std::string(",") + e + ",";
  return list.find(std::string(",") + feature + ",") != std::string::npos;
}

bool cpu_has(const char* feature) {
  if (pretend_lacks(feature)) return false;
#if FIPS_X86_LEVELS
  __builtin_cpu_init();  // (the checks include the OS's support for the wider registers)
  if (std::strcmp(feature, "avx2") == 0) return __builtin_cpu_supports("avx2");
  if (std::strcmp(feature, "fma") == 0) return __builtin_cpu_supports("fma");
  if (std::strcmp(feature, "popcnt") == 0) return __builtin_cpu_supports("popcnt");
  if (std::strcmp(feature, "avx512f") == 0) return __builtin_cpu_supports("avx512f");
#endif
  return false;
}

// The CPU features a level needs that this CPU lacks ("" when it has them all).
std::string missing_features(int level) {
  static const char* const kAvx2Needs[] = {"avx2", "fma", "popcnt"};
  std::string out;
  auto need = [&](const char* f) {
    if (!cpu_has(f)) out += (out.empty() ? "" : ", ") + std::string(f);
  };
  if (level == kAvx512) need("avx512f");
  if (level >= kAvx2)
    for (const char* f : kAvx2Needs) need(f);
  return out;
}

std::string runnable_levels() {
  std::string out = kLevelNames[kPortable];
  for (int l = kPortable + 1; l <= kTopLevel; ++l)
    if (missing_features(l).empty()) out += std::string(", ") + kLevelNames[l];
  return out;
}

struct Choice {
  int level = kPortable;
  std::string error;  // empty: `level` is usable
};

Choice choose() {
  Choice c;
  if (env_flag("FIPS_SPARSE_FORCE_SCALAR")) return c;
  const char* isa = std::getenv("FIPS_SPARSE_ISA");
  const std::string want = isa ? isa : "";
  if (want.empty() || want == "auto") {
    for (int l = kTopLevel; l > kPortable; --l)
      if (missing_features(l).empty()) {
        c.level = l;
        break;
      }
    return c;
  }
  int level = -1;
  if (want == "portable" || want == "scalar") level = kPortable;
  else if (want == "avx2") level = kAvx2;
  else if (want == "avx512" || want == "avx512f") level = kAvx512;
  const std::string head = "kernel level: FIPS_SPARSE_ISA=" + want;
  if (level < 0) {
    c.error = head + " is not one of auto, portable, avx2, avx512";
  } else if (level > kTopLevel) {
    c.error = head + ": this build of the kernel library has only the levels " + kernel_levels();
  } else {
    const std::string missing = missing_features(level);
    if (!missing.empty())
      c.error = head + " needs " + missing + ", which this CPU lacks (levels it can run: " + runnable_levels() + ")";
    else
      c.level = level;
  }
  return c;
}

const Choice& choice() {
  static const Choice c = choose();
  return c;
}

int level_or_throw() {
  const Choice& c = choice();
  if (!c.error.empty()) throw std::runtime_error(c.error);
  return c.level;
}

}  // namespace

const char* kernel_isa() { return choice().error.empty() ? kLevelNames[choice().level] : "unavailable"; }

const char* kernel_select_error() { return choice().error.empty() ? nullptr : choice().error.c_str(); }

const char* kernel_levels() { return FIPS_X86_LEVELS ? "portable,avx2,avx512" : "portable"; }

const char* kernel_sources_id() { return kSourcesId; }

void spmm_nn(const SparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& run) {
  switch (level_or_throw()) {
#if FIPS_X86_LEVELS
    case kAvx512: return avx512::spmm_nn(V, A, T, Y, run);
    case kAvx2: return avx2::spmm_nn(V, A, T, Y, run);
#endif
    default: return portable::spmm_nn(V, A, T, Y, run);
  }
}

void spmm_nt(const SparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& run) {
  switch (level_or_throw()) {
#if FIPS_X86_LEVELS
    case kAvx512: return avx512::spmm_nt(V, A, T, Y, run);
    case kAvx2: return avx2::spmm_nt(V, A, T, Y, run);
#endif
    default: return portable::spmm_nt(V, A, T, Y, run);
  }
}

// ---- fips.QSparseMatMul (qsparse_kernels.h) --------------------------------------------------
const char* check_quant_attrs(int64_t bits, int64_t group_size) {
  if (bits != 4 && bits != 8) return "bits must be 4 or 8";
  if (group_size < 0 || group_size > kMaxBits) return "group_size must be >= 0 and < 2**31";
  return nullptr;
}

int64_t quant_code_bytes(int64_t bits, int64_t nnz) { return bits == 8 ? nnz : nnz / 2 + (nnz % 2); }

int64_t quant_num_scales(int64_t rows, int64_t group_size, int64_t nnz) {
  return group_size == 0 ? rows : nnz / group_size + (nnz % group_size != 0);
}

void qspmm_nn(const QSparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& run) {
  switch (level_or_throw()) {
#if FIPS_X86_LEVELS
    case kAvx512: return avx512::qspmm_nn(V, A, T, Y, run);
    case kAvx2: return avx2::qspmm_nn(V, A, T, Y, run);
#endif
    default: return portable::qspmm_nn(V, A, T, Y, run);
  }
}

void qspmm_nt(const QSparseMatrix& V, const float* A, int64_t T, float* Y, const TaskRunner& run) {
  switch (level_or_throw()) {
#if FIPS_X86_LEVELS
    case kAvx512: return avx512::qspmm_nt(V, A, T, Y, run);
    case kAvx2: return avx2::qspmm_nt(V, A, T, Y, run);
#endif
    default: return portable::qspmm_nt(V, A, T, Y, run);
  }
}

void qdequantize(const QSparseMatrix& V, float* out, const TaskRunner& run) {
  switch (level_or_throw()) {
#if FIPS_X86_LEVELS
    case kAvx512: return avx512::qdequantize(V, out, run);
    case kAvx2: return avx2::qdequantize(V, out, run);
#endif
    default: return portable::qdequantize(V, out, run);
  }
}

}  // namespace fips
