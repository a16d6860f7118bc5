// CPU epilogues of the linear cross-entropy, bound as nckernels._C (or nckernels_C when
// JIT-built by nckernels/_ext.py).
//
//   ce_rows_forward(z, target, class_weight, label_smoothing, softcap) -> (lse, lse_lo, z_target, z_smooth)
//   ce_rows_backward_(z, target, class_weight, lse, lse_lo, coef_p, coef_target, coef_uniform, softcap) -> z
//
// Same semantics as rows_forward / rows_backward_ in nckernels/reference/linear_cross_entropy.py
// (the spec): z is an (n, V) fp32 contiguous chunk of raw logits, z' = softcap tanh(z / softcap)
// when softcap > 0 (else z' = z). The forward makes one pass per row (online block max + sum of
// exp, accumulated in double) and leaves z untouched; the backward overwrites z with
// dL/dz = (a p - b onehot - c omega) * dz'/dz in one pass. Rows are spread over OpenMP threads
// (at::get_num_threads() of them). The inner loops are vectorised for SSE2, AVX2 and AVX-512
// and the widest one the CPU supports is used (set_cpu_isa / NCKERNELS_CPU_ISA override it).
//
// Includes are kept narrow (not <torch/extension.h>): this halves the build time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/StringUtil.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "nck_ext.h"

#define NCK_ISA_KERNELS "linear_ce_cpu_rows.h"
#include "nck_multi_isa.h"

namespace {

struct IsaKernels {
  const char* name;
  decltype(&isa_generic::forward_row_fn) forward;
  decltype(&isa_generic::backward_row_fn) backward;
};

const IsaKernels kIsas[] = {
    {"generic", isa_generic::forward_row_fn, isa_generic::backward_row_fn},
#if NCK_MULTI_ISA
    {"avx2", isa_avx2::forward_row_fn, isa_avx2::backward_row_fn},
    {"avx512", isa_avx512::forward_row_fn, isa_avx512::backward_row_fn},
#endif
};
constexpr int kNumIsas = sizeof(kIsas) / sizeof(kIsas[0]);

bool isa_supported(int i) {
#if NCK_MULTI_ISA
  __builtin_cpu_init();
  const std::string name = kIsas[i].name;
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return i == 0;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (int i = 0; i < kNumIsas; ++i)
    if (isa_supported(i)) out.emplace_back(kIsas[i].name);
  return out;
}

int best_isa() {
  int best = 0;
  for (int i = 0; i < kNumIsas; ++i)
    if (isa_supported(i)) best = i;
  return best;
}

int isa_index(const std::string& name) {
  if (name == "auto") return best_isa();
  for (int i = 0; i < kNumIsas; ++i) {
    if (name == kIsas[i].name) {
      TORCH_CHECK_VALUE(isa_supported(i), "nckernels: this CPU does not support the '", name, "' kernels");
      return i;
    }
  }
  TORCH_CHECK_VALUE(false, "nckernels: unknown CPU ISA '", name, "'; expected 'auto' or one of ",
                    c10::Join(", ", supported_isas()));
  return 0;
}

std::atomic<int> g_isa{-1};

const IsaKernels& kernels() {
  int i = g_isa.load(std::memory_order_relaxed);
  if (i < 0) {
    const char* env = std::getenv("NCKERNELS_CPU_ISA");
    i = isa_index(env && *env ? env : "auto");
    g_isa.store(i, std::memory_order_relaxed);
  }
  return kIsas[i];
}

void set_cpu_isa(const std::string& name) { g_isa.store(isa_index(name), std::memory_order_relaxed); }
std::string cpu_isa() { return kernels().name; }

void check_vector(const char* fn, const char* name, const at::Tensor& t, int64_t n, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, fn, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, fn, ": ", name, " must have shape (", n, ",), got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

// Checks z, target, class_weight and softcap; returns the class weights' pointer (or nullptr).
const float* check_rows(const char* fn, const at::Tensor& z, const at::Tensor& target,
                        const std::optional<at::Tensor>& class_weight, double softcap) {
  TORCH_CHECK_VALUE(z.device().is_cpu(), fn, ": z must be a CPU tensor, got ", z.device());
  TORCH_CHECK_TYPE(z.scalar_type() == at::kFloat, fn, ": z must be float32, got ", z.scalar_type());
  TORCH_CHECK_VALUE(z.dim() == 2, fn, ": z must be 2-D (n, V), got shape ", z.sizes());
  TORCH_CHECK_VALUE(z.is_contiguous(), fn, ": z must be contiguous");
  const int64_t n = z.size(0), V = z.size(1);
  TORCH_CHECK_VALUE(V > 0, fn, ": z must have at least one column (class)");
  check_vector(fn, "target", target, n, at::kLong);
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_INDEX(t[i] >= 0 && t[i] < V, fn, ": target[", i, "] = ", t[i], " is outside [0, ", V, ")");
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, fn, ": softcap must be a finite number >= 0 (0: none), got ",
                    softcap);
  if (class_weight.has_value() && class_weight->defined()) {
    check_vector(fn, "class_weight", *class_weight, V, at::kFloat);
    return class_weight->data_ptr<float>();
  }
  return nullptr;
}

bool run_parallel(int64_t n, int64_t V) { return n > 1 && n * V >= (int64_t{1} << 15); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_rows_forward(
    const at::Tensor& z, const at::Tensor& target, const std::optional<at::Tensor>& class_weight,
    double label_smoothing, double softcap) {
  const char* fn = "ce_rows_forward";
  const float* omega = check_rows(fn, z, target, class_weight, softcap);
  TORCH_CHECK_VALUE(std::isfinite(label_smoothing) && label_smoothing >= 0, fn,
                    ": label_smoothing must be a finite number >= 0, got ", label_smoothing);
  const int64_t n = z.size(0), V = z.size(1);
  auto opts = z.options();
  at::Tensor lse = at::empty({n}, opts), lse_lo = at::empty({n}, opts);
  at::Tensor z_target = at::empty({n}, opts), z_smooth = at::empty({n}, opts);
  const auto row = kernels().forward(softcap > 0, omega != nullptr, label_smoothing > 0);
  const float* zp = z.data_ptr<float>();
  const int64_t* tp = target.data_ptr<int64_t>();
  float* lp = lse.data_ptr<float>();
  float* lop = lse_lo.data_ptr<float>();
  float* ztp = z_target.data_ptr<float>();
  float* zsp = z_smooth.data_ptr<float>();
  const float cap = static_cast<float>(softcap);
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (run_parallel(n, V))
  for (int64_t i = 0; i < n; ++i) {
    float out[4];
    row(zp + i * V, V, tp[i], omega, cap, out);
    lp[i] = out[0];
    lop[i] = out[1];
    ztp[i] = out[2];
    zsp[i] = out[3];
  }
  return {lse, lse_lo, z_target, z_smooth};
}

at::Tensor ce_rows_backward_(at::Tensor z, const at::Tensor& target, const std::optional<at::Tensor>& class_weight,
                             const at::Tensor& lse, const at::Tensor& lse_lo, const at::Tensor& coef_p,
                             const at::Tensor& coef_target,
                             const at::Tensor& coef_uniform, double softcap) {
  const char* fn = "ce_rows_backward_";
  const float* omega = check_rows(fn, z, target, class_weight, softcap);
  const int64_t n = z.size(0), V = z.size(1);
  check_vector(fn, "lse", lse, n, at::kFloat);
  check_vector(fn, "lse_lo", lse_lo, n, at::kFloat);
  check_vector(fn, "coef_p", coef_p, n, at::kFloat);
  check_vector(fn, "coef_target", coef_target, n, at::kFloat);
  check_vector(fn, "coef_uniform", coef_uniform, n, at::kFloat);
  const auto row = kernels().backward(softcap > 0, omega != nullptr);
  float* zp = z.data_ptr<float>();
  const int64_t* tp = target.data_ptr<int64_t>();
  const float *lp = lse.data_ptr<float>(), *lop = lse_lo.data_ptr<float>(), *ap = coef_p.data_ptr<float>();
  const float *bp = coef_target.data_ptr<float>(), *cp = coef_uniform.data_ptr<float>();
  const float cap = static_cast<float>(softcap);
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (run_parallel(n, V))
  for (int64_t i = 0; i < n; ++i) row(zp + i * V, V, tp[i], omega, cap, lp[i], lop[i], ap[i], bp[i], cp[i]);
  return z;
}

}  // namespace

namespace nck {
const char* active_cpu_isa() { return kernels().name; }
void check_vector(const char* fn, const char* name, const at::Tensor& t, int64_t n, at::ScalarType dtype) {
  ::check_vector(fn, name, t, n, dtype);
}
void check_rows(const char* fn, const at::Tensor& z, const at::Tensor& target) {
  ::check_rows(fn, z, target, std::nullopt, 0.0);
}
bool run_parallel(int64_t n, int64_t V) { return ::run_parallel(n, V); }
}  // namespace nck

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nckernels C++ CPU kernels (linear cross-entropy and StableMax row epilogues)";
  m.def("ce_rows_forward", &ce_rows_forward, py::arg("z"), py::arg("target"), py::arg("class_weight"),
        py::arg("label_smoothing"), py::arg("softcap"),
        "Per-row (lse, lse_lo, z'_target, sum_j omega_j z'_j) of raw fp32 logits z (n, V); z is not modified.\n"
        "lse + lse_lo is the log-sum-exp to about twice fp32's precision (lse_lo: its rounding residual).\n"
        "z_smooth is zeros unless label_smoothing > 0; softcap 0 means none.");
  m.def("ce_rows_backward_", &ce_rows_backward_, py::arg("z"), py::arg("target"), py::arg("class_weight"),
        py::arg("lse"), py::arg("lse_lo"), py::arg("coef_p"), py::arg("coef_target"), py::arg("coef_uniform"), py::arg("softcap"),
        "Overwrite raw fp32 logits z (n, V) with dL/dz = (a p - b onehot - c omega) * dz'/dz, "
        "p = exp((z' - lse) - lse_lo); returns z.");
  m.def("cpu_isa", &cpu_isa, "Name of the instruction set whose kernels run ('generic', 'avx2', 'avx512').");
  m.def("set_cpu_isa", &set_cpu_isa, py::arg("name"),
        "Choose the kernels' instruction set: 'auto' (the widest supported) or a name from supported_cpu_isas().");
  m.def("supported_cpu_isas", &supported_isas, "Instruction sets this build has kernels for and this CPU supports.");
  nck::init_stablemax(m);  // csrc/stablemax_cpu.cpp
  nck::init_class_stats(m);  // csrc/class_stats_cpu.cpp
}
