// Shared pieces of the nckernels._C extension, defined in csrc/linear_ce_cpu.cpp (which owns the
// single PYBIND11_MODULE) and used by the other translation units (csrc/stablemax_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>

namespace nck {

// Name of the instruction set the kernels run with ("generic", "avx2", "avx512"): the one chosen by
// set_cpu_isa / NCKERNELS_CPU_ISA, else the widest the CPU supports.
const char* active_cpu_isa();

// Argument checks (clear TypeError / ValueError / IndexError messages prefixed by `fn`).
void check_vector(const char* fn, const char* name, const at::Tensor& t, int64_t n, at::ScalarType dtype);
// z: CPU fp32 contiguous (n, V) with V > 0; target: CPU int64 contiguous (n,) with values in [0, V).
void check_rows(const char* fn, const at::Tensor& z, const at::Tensor& target);

// Whether an (n, V) row loop is worth spreading over OpenMP threads.
bool run_parallel(int64_t n, int64_t V);

// Registration of the other translation units' functions, called from the PYBIND11_MODULE.
void init_stablemax(pybind11::module_& m);
void init_class_stats(pybind11::module_& m);  // csrc/class_stats_cpu.cpp

}  // namespace nck
