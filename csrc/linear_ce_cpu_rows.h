// Per-row epilogues of the CPU linear cross-entropy (see csrc/linear_ce_cpu.cpp).
//
// This header is included once per instruction set by linear_ce_cpu.cpp (through nck_multi_isa.h),
// each time inside its own `namespace NCK_ISA` and (on x86-64 GCC) under a `#pragma GCC target(...)`, so
// that the same plain C++ loops are auto-vectorised for SSE2, AVX2 and AVX-512 and the
// best one is picked at run time. It must stay free of includes and of std:: templates.
//
// exp and tanh are branch-free single-precision approximations (Cephes expf / tanhf,
// about 1-2 ulp) that the compiler vectorises inside `#pragma omp simd` loops; their
// special values follow IEEE: exp(-inf) = 0, exp(+inf) = +inf, NaN -> NaN;
// tanh(+-inf) = +-1. exp flushes results below 2^-126 to 0.

#ifndef NCK_ISA
#error "define NCK_ISA before including linear_ce_cpu_rows.h"
#endif

namespace NCK_ISA {

static inline float exp_approx(float x) {
  const float lo = -87.33654f;  // exp(lo) = 2^-126: below it, return 0
  const float hi = 88.0f;       // above it, return +inf (exp(88.72) overflows float)
  float xc = x < lo ? lo : x;   // comparisons keep NaN (min/max would drop it)
  xc = xc > hi ? hi : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = xc * 1.44269504088896341f + magic;
  const float n = t - magic;  // round(x / ln 2)
  float r = xc - n * 0.693359375f;  // Cody-Waite: ln 2 = C1 + C2
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  int32_t ti;
  __builtin_memcpy(&ti, &t, sizeof ti);
  const int32_t bits = (ti - 0x4B400000 + 127) << 23;  // 2^n, n in [-126, 127]
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  float res = p * scale;
  res = x < lo ? 0.0f : res;
  res = x > hi ? __builtin_inff() : res;
  return res;
}

static inline float tanh_approx(float x) {
  const float a = x < 0.0f ? -x : x;
  // |x| < 0.625: odd polynomial; else 1 - 2 / (exp(2|x|) + 1) (saturates to 1 at large |x|)
  const float x2 = x * x;
  float ps = -5.70498872745e-3f;
  ps = ps * x2 + 2.06390887954e-2f;
  ps = ps * x2 - 5.37397155531e-2f;
  ps = ps * x2 + 1.33314422036e-1f;
  ps = ps * x2 - 3.33332819422e-1f;
  ps = ps * x2 * x + x;
  float pl = 1.0f - 2.0f / (exp_approx(a + a) + 1.0f);
  pl = x < 0.0f ? -pl : pl;
  return a < 0.625f ? ps : pl;
}

// softcap c > 0: z' = c tanh(z / c)
static inline float capped(float z, float cap) { return cap * tanh_approx(z / cap); }

constexpr int64_t kBlock = 256;  // a multiple of kLanes
constexpr int kLanes = 16;        // independent accumulators (one AVX-512 register, 2 AVX2, 4 SSE)

static inline float block_max(const float* __restrict x, int64_t len) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = -__builtin_inff();
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] = x[k + l] > acc[l] ? x[k + l] : acc[l];
  }
  float m = -__builtin_inff();
  for (; k < len; ++k) m = x[k] > m ? x[k] : m;
  for (int l = 0; l < kLanes; ++l) m = acc[l] > m ? acc[l] : m;
  return m;  // NaNs are skipped: the sums that follow propagate them
}

template <bool WEIGHT>
static inline float block_sum(const float* __restrict x, const float* __restrict w, int64_t len) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = 0.0f;
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] += WEIGHT ? w[k + l] * x[k + l] : x[k + l];
  }
  float s = 0.0f;
  for (; k < len; ++k) s += WEIGHT ? w[k] * x[k] : x[k];
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

static inline float block_sum_exp(const float* __restrict x, float shift, int64_t len) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = 0.0f;
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] += exp_approx(x[k + l] - shift);
  }
  float s = 0.0f;
  for (; k < len; ++k) s += exp_approx(x[k] - shift);
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// One pass over a row of raw logits z[0..V): online (block-wise) max and sum of exp, the
// target logit and sum_j omega_j z'_j. Writes lse, lse_lo, z'_target, z_smooth to out[0..4):
// lse = shift + log(sum) is formed in double and split into fl(lse) and its rounding residual.
template <bool SOFTCAP, bool WEIGHT, bool SMOOTH>
static void forward_row(const float* __restrict z, int64_t V, int64_t target,
                        const float* __restrict omega, float cap, float* __restrict out) {
  alignas(64) float buf[kBlock];  // z' of the block (softcap)
  float run_max = -__builtin_inff();  // largest z' seen so far
  float shift = 0.0f;                 // finite shift of the running sum (0 while max is +-inf)
  double sum = 0.0;                   // sum exp(z' - shift)
  double smooth = 0.0;
  float z_target = 0.0f;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t len = V - b0 < kBlock ? V - b0 : kBlock;
    const float* src = z + b0;
    if (SOFTCAP) {
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) buf[k] = capped(src[k], cap);
      src = buf;
    }
    const float bmax = block_max(src, len);
    if (bmax > run_max) {
      // like torch.logsumexp: an infinite max shifts by 0 (all -inf -> -inf, +inf -> +inf)
      const float new_shift = (bmax == __builtin_inff()) ? 0.0f : bmax;
      if (sum != 0.0) sum *= __builtin_exp(static_cast<double>(shift) - static_cast<double>(new_shift));
      run_max = bmax;
      shift = new_shift;
    }
    sum += block_sum_exp(src, shift, len);
    if (SMOOTH) smooth += block_sum<WEIGHT>(src, WEIGHT ? omega + b0 : nullptr, len);
    if (target >= b0 && target < b0 + len) z_target = src[target - b0];
  }
  const double lse = static_cast<double>(shift) + __builtin_log(sum);
  const float hi = static_cast<float>(lse);
  const bool finite = __builtin_isfinite(hi);
  out[0] = hi;
  out[1] = finite ? static_cast<float>(lse - static_cast<double>(hi)) : 0.0f;
  out[2] = z_target;
  out[3] = static_cast<float>(smooth);
}

// In place: z[j] <- (a exp((z'_j - lse) - lse_lo) - b [j = target] - c omega_j) * dz'_j/dz_j.
template <bool SOFTCAP, bool WEIGHT>
static void backward_row(float* __restrict z, int64_t V, int64_t target, const float* __restrict omega,
                         float cap, float lse, float lse_lo, float a, float b, float c) {
  const float z_t = z[target];
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const float x = z[j];
    float zp = x, th = 0.0f;
    if (SOFTCAP) {
      th = tanh_approx(x / cap);
      zp = cap * th;
    }
    float g = a * exp_approx((zp - lse) - lse_lo) - c * (WEIGHT ? omega[j] : 1.0f);
    if (SOFTCAP) g *= 1.0f - th * th;
    z[j] = g;
  }
  float zp = z_t, th = 0.0f;
  if (SOFTCAP) {
    th = tanh_approx(z_t / cap);
    zp = cap * th;
  }
  float g = a * exp_approx((zp - lse) - lse_lo) - b - c * (WEIGHT ? omega[target] : 1.0f);
  if (SOFTCAP) g *= 1.0f - th * th;
  z[target] = g;
}

using ForwardRowFn = void (*)(const float*, int64_t, int64_t, const float*, float, float*);
using BackwardRowFn = void (*)(float*, int64_t, int64_t, const float*, float, float, float, float, float, float);

static ForwardRowFn forward_row_fn(bool softcap, bool weight, bool smooth) {
  if (softcap) {
    if (weight) return smooth ? forward_row<true, true, true> : forward_row<true, true, false>;
    return smooth ? forward_row<true, false, true> : forward_row<true, false, false>;
  }
  if (weight) return smooth ? forward_row<false, true, true> : forward_row<false, true, false>;
  return smooth ? forward_row<false, false, true> : forward_row<false, false, false>;
}

static BackwardRowFn backward_row_fn(bool softcap, bool weight) {
  if (softcap) return weight ? backward_row<true, true> : backward_row<true, false>;
  return weight ? backward_row<false, true> : backward_row<false, false>;
}

}  // namespace NCK_ISA
