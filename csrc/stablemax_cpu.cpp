// CPU StableMax epilogues, bound into nckernels._C by nck::init_stablemax (called from the
// PYBIND11_MODULE in csrc/linear_ce_cpu.cpp).
//
//   stablemax_rows_forward(z, target) -> (s_target, s_other)
//   stablemax_rows_backward_(z, target, norm, coef_p, coef_t) -> z
//
// Same semantics as stablemax_rows_forward / stablemax_rows_backward_ in
// nckernels/reference/rowwise.py (the spec), with s(z) = z + 1 (z >= 0), 1 / (1 - z) (z < 0):
// z is an (n, V) fp32 contiguous chunk of logits and target (n,) int64 in [0, V). The forward
// makes one pass per row and returns s(z_target) and sum_{j != target} s(z_j) (accumulated in
// double, returned as fp32); z is untouched. The backward overwrites z with
// (coef_p s(z) / norm - coef_t [j = target]) / (1 + |z|) in one pass. Rows are spread over
// OpenMP threads; the inner loops are compiled for SSE2, AVX2 and AVX-512 and run with the
// instruction set chosen by set_cpu_isa / NCKERNELS_CPU_ISA (see linear_ce_cpu.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <cstring>
#include <tuple>

#include "nck_ext.h"

#define NCK_ISA_KERNELS "stablemax_cpu_rows.h"
#include "nck_multi_isa.h"

namespace {

struct StablemaxKernels {
  const char* name;
  decltype(&isa_generic::stablemax_forward_row) forward;
  decltype(&isa_generic::stablemax_backward_row) backward;
};

const StablemaxKernels kStablemaxIsas[] = {
    {"generic", isa_generic::stablemax_forward_row, isa_generic::stablemax_backward_row},
#if NCK_MULTI_ISA
    {"avx2", isa_avx2::stablemax_forward_row, isa_avx2::stablemax_backward_row},
    {"avx512", isa_avx512::stablemax_forward_row, isa_avx512::stablemax_backward_row},
#endif
};

// The kernels of the instruction set linear_ce_cpu.cpp's dispatcher has chosen (same names).
const StablemaxKernels& stablemax_kernels() {
  const char* name = nck::active_cpu_isa();
  for (const auto& k : kStablemaxIsas)
    if (std::strcmp(k.name, name) == 0) return k;
  return kStablemaxIsas[0];
}

std::tuple<at::Tensor, at::Tensor> stablemax_rows_forward(const at::Tensor& z, const at::Tensor& target) {
  const char* fn = "stablemax_rows_forward";
  nck::check_rows(fn, z, target);
  const int64_t n = z.size(0), V = z.size(1);
  at::Tensor s_target = at::empty({n}, z.options()), s_other = at::empty({n}, z.options());
  const auto row = stablemax_kernels().forward;
  const float* zp = z.data_ptr<float>();
  const int64_t* tp = target.data_ptr<int64_t>();
  float* stp = s_target.data_ptr<float>();
  float* sop = s_other.data_ptr<float>();
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (nck::run_parallel(n, V))
  for (int64_t i = 0; i < n; ++i) {
    float out[2];
    row(zp + i * V, V, tp[i], out);
    stp[i] = out[0];
    sop[i] = out[1];
  }
  return {s_target, s_other};
}

at::Tensor stablemax_rows_backward_(at::Tensor z, const at::Tensor& target, const at::Tensor& norm,
                                    const at::Tensor& coef_p, const at::Tensor& coef_t) {
  const char* fn = "stablemax_rows_backward_";
  nck::check_rows(fn, z, target);
  const int64_t n = z.size(0), V = z.size(1);
  nck::check_vector(fn, "norm", norm, n, at::kFloat);
  nck::check_vector(fn, "coef_p", coef_p, n, at::kFloat);
  nck::check_vector(fn, "coef_t", coef_t, n, at::kFloat);
  const auto row = stablemax_kernels().backward;
  float* zp = z.data_ptr<float>();
  const int64_t* tp = target.data_ptr<int64_t>();
  const float *np = norm.data_ptr<float>(), *ap = coef_p.data_ptr<float>(), *bp = coef_t.data_ptr<float>();
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (nck::run_parallel(n, V))
  for (int64_t i = 0; i < n; ++i) {
    const float c = static_cast<float>(static_cast<double>(ap[i]) / static_cast<double>(np[i]));
    row(zp + i * V, V, tp[i], c, bp[i]);
  }
  return z;
}

}  // namespace

namespace nck {

void init_stablemax(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("stablemax_rows_forward", &stablemax_rows_forward, py::arg("z"), py::arg("target"),
        "Per-row (s(z_target), sum_{j != target} s(z_j)) of fp32 logits z (n, V), s(z) = z + 1 (z >= 0),\n"
        "1 / (1 - z) (z < 0); the sum is accumulated in double. z is not modified.");
  m.def("stablemax_rows_backward_", &stablemax_rows_backward_, py::arg("z"), py::arg("target"), py::arg("norm"),
        py::arg("coef_p"), py::arg("coef_t"),
        "Overwrite fp32 logits z (n, V) with (coef_p s(z) / norm - coef_t [j = target]) / (1 + |z|); returns z.");
}

}  // namespace nck
