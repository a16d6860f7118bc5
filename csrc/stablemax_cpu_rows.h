// Per-row StableMax epilogues (see csrc/stablemax_cpu.cpp).
//
// Like linear_ce_cpu_rows.h, this header is included once per instruction set (nck_multi_isa.h) by
// stablemax_cpu.cpp, each time inside its own `namespace NCK_ISA` and (on x86-64 GCC) under a
// `#pragma GCC target(...)`, so that the same plain loops are auto-vectorised for SSE2, AVX2
// and AVX-512. It must stay free of includes and of std:: templates.
//
// s(z) = z + 1 (z >= 0), 1 / (1 - z) (z < 0). Both branches are evaluated branch-free with
// selects; the reciprocal is taken of 1 + |z| (= 1 - z where it is used), which is >= 1 for every
// z, so z = 1 gives no inf and no NaN. NaN propagates (NaN >= 0 is false, 1 / (1 + NaN) = NaN);
// s(+inf) = +inf, s(-inf) = 0.

#ifndef NCK_ISA
#error "define NCK_ISA before including stablemax_cpu_rows.h"
#endif

namespace NCK_ISA {

constexpr int kSmLanes = 16;  // independent double accumulators (2 AVX-512 registers)

static inline float stablemax_s(float z) {
  const float a = z < 0.0f ? -z : z;
  const float inv = 1.0f / (1.0f + a);
  return z >= 0.0f ? z + 1.0f : inv;
}

// sum_{k < len} s(x[k]), accumulated in double (16 lanes, then summed).
static inline double stablemax_sum(const float* __restrict x, int64_t len) {
  double acc[kSmLanes];
  for (int l = 0; l < kSmLanes; ++l) acc[l] = 0.0;
  int64_t k = 0;
  for (; k + kSmLanes <= len; k += kSmLanes) {
#pragma omp simd
    for (int l = 0; l < kSmLanes; ++l) acc[l] += static_cast<double>(stablemax_s(x[k + l]));
  }
  double s = 0.0;
  for (; k < len; ++k) s += static_cast<double>(stablemax_s(x[k]));
  for (int l = 0; l < kSmLanes; ++l) s += acc[l];
  return s;
}

// One pass over a row of logits z[0..V): out[0] = s(z_target), out[1] = sum_{j != target} s(z_j).
static void stablemax_forward_row(const float* __restrict z, int64_t V, int64_t target, float* __restrict out) {
  const double other = stablemax_sum(z, target) + stablemax_sum(z + target + 1, V - target - 1);
  out[0] = stablemax_s(z[target]);
  out[1] = static_cast<float>(other);
}

// In place: z[j] <- (c s(z_j) - b [j = target]) / (1 + |z_j|), with c = coef_p / norm.
// For j != target: s(z) / (1 + |z|) needs one reciprocal, since 1 / (1 + |z|) = s(z) for z < 0.
static void stablemax_backward_row(float* __restrict z, int64_t V, int64_t target, float c, float b) {
  const float z_t = z[target];
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const float x = z[j];
    const float a = x < 0.0f ? -x : x;
    const float inv = 1.0f / (1.0f + a);
    const float s = x >= 0.0f ? x + 1.0f : inv;
    z[j] = (c * s) * inv;
  }
  const float a = z_t < 0.0f ? -z_t : z_t;
  z[target] = (c * stablemax_s(z_t) - b) / (1.0f + a);
}

}  // namespace NCK_ISA
