// Compiles the kernel header named by NCK_ISA_KERNELS once per instruction set, each time inside
// its own `namespace NCK_ISA`: isa_generic (the build's baseline, SSE2 on x86-64) and, on x86-64
// GCC, isa_avx2 and isa_avx512 under `#pragma GCC target(...)`, so that the same plain C++ loops
// are auto-vectorised for each and the widest one the CPU supports is picked at run time
// (csrc/linear_ce_cpu.cpp owns that choice). Defines NCK_MULTI_ISA to 1 when the AVX variants
// exist, else 0.
//
//   #define NCK_ISA_KERNELS "my_rows.h"
//   #include "nck_multi_isa.h"
//
// No include guard: a translation unit includes it once per kernel header.
#ifndef NCK_ISA_KERNELS
#error "define NCK_ISA_KERNELS (the kernel header) before including nck_multi_isa.h"
#endif

#define NCK_ISA isa_generic
#include NCK_ISA_KERNELS
#undef NCK_ISA

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NCK_MULTI_ISA 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,f16c")
#define NCK_ISA isa_avx2
#include NCK_ISA_KERNELS
#undef NCK_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,bmi,bmi2,f16c,prefer-vector-width=512")
#define NCK_ISA isa_avx512
#include NCK_ISA_KERNELS
#undef NCK_ISA
#pragma GCC pop_options
#else
#define NCK_MULTI_ISA 0
#endif

#undef NCK_ISA_KERNELS
