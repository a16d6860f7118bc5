// CPU per-class statistics ("segmented class statistics", DESIGN family 2), bound into
// nckernels._C by nck::init_class_stats (called from the PYBIND11_MODULE in csrc/linear_ce_cpu.cpp).
//
//   class_stats_cpu(features, labels, num_classes, ignore_index) -> (counts, sums, m2)
//
// Same semantics as nckernels/reference/segment.py (the spec): features (N, D) fp32 / fp16 / bf16 /
// fp64, labels (N,) int64; rows labelled ignore_index are skipped. counts (C,) int64, sums (C, D)
// fp64 (the sum of each class's rows) and m2 (C,) fp64 = sum over the class's rows of
// ||h - mean_c||^2 about the class's own mean in this batch. Empty classes get 0 everywhere.
//
// Algorithm:
//   1. One serial pass counts the labels (and checks their range); a counting sort (O(N + C))
//      lists each class's row indices in ascending order.
//   2. Work is cut into tasks of about K rows (K = chunk_rows(D, itemsize): 256 for rows of at
//      most 1 KiB, so that a task's rows stay in L2): a run of consecutive classes with at most K
//      rows each and at most K rows + classes in all, or one chunk of a class with more than K
//      rows (such a class is split into equal chunks of at most K rows).
//      Tasks are spread over OpenMP threads with schedule(dynamic), so a class that holds a large
//      share of the rows is processed by every thread.
//   3. Each class or chunk is a true two-pass computation in double: its sum, then the sum of
//      squared residuals about its own mean (the second pass re-reads rows that are still in
//      cache). Every feature is converted to double before any arithmetic.
//   4. Chunks of one class are merged exactly with Chan's formula,
//      M2 = sum_k M2_k + sum_k n_k ||mean_k - mean_c||^2 (parallel over classes).
// Results do not depend on the number of threads (fixed chunks, fixed summation order).
//
// The inner loops are compiled for SSE2, AVX2 and AVX-512 and run with the instruction set chosen
// by set_cpu_isa / NCKERNELS_CPU_ISA (see linear_ce_cpu.cpp). Instead of a separate header, this
// file includes itself once per instruction set: the part under NCK_CLASS_STATS_KERNELS at the end
// (the kernels) is compiled in `namespace NCK_ISA` under a `#pragma GCC target(...)`; it must
// stay free of includes and of std:: templates (they would be shared between instruction sets).

#ifndef NCK_CLASS_STATS_KERNELS

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "nck_ext.h"

#define NCK_CLASS_STATS_KERNELS 1

#define NCK_ISA_KERNELS "class_stats_cpu.cpp"
#include "nck_multi_isa.h"

namespace {

using ChunkFn = decltype(&isa_generic::chunk_stats<isa_generic::kF32>);
using MergeFn = decltype(&isa_generic::merge_chunks);

struct ClassStatsKernels {
  const char* name;
  ChunkFn chunk[isa_generic::kNumKinds];  // indexed by isa_generic::Kind
  MergeFn merge;
};

const ClassStatsKernels kClassStatsIsas[] = {
    {"generic",
     {isa_generic::chunk_stats<isa_generic::kF32>, isa_generic::chunk_stats<isa_generic::kF64>,
      isa_generic::chunk_stats<isa_generic::kBF16>, isa_generic::chunk_stats<isa_generic::kF16>},
     isa_generic::merge_chunks},
#if NCK_MULTI_ISA
    {"avx2",
     {isa_avx2::chunk_stats<isa_avx2::kF32>, isa_avx2::chunk_stats<isa_avx2::kF64>,
      isa_avx2::chunk_stats<isa_avx2::kBF16>, isa_avx2::chunk_stats<isa_avx2::kF16>},
     isa_avx2::merge_chunks},
    {"avx512",
     {isa_avx512::chunk_stats<isa_avx512::kF32>, isa_avx512::chunk_stats<isa_avx512::kF64>,
      isa_avx512::chunk_stats<isa_avx512::kBF16>, isa_avx512::chunk_stats<isa_avx512::kF16>},
     isa_avx512::merge_chunks},
#endif
};

// The kernels of the instruction set linear_ce_cpu.cpp's dispatcher has chosen (same names).
const ClassStatsKernels& class_stats_kernels() {
  const char* name = nck::active_cpu_isa();
  for (const auto& k : kClassStatsIsas)
    if (std::strcmp(k.name, name) == 0) return k;
  return kClassStatsIsas[0];
}

// Rows per task / chunk: 256, halved while a chunk's rows take more than 256 KiB (so that the
// second pass over a chunk reads from L2), but at least 16.
int64_t chunk_rows(int64_t D, int64_t itemsize) {
  int64_t k = 256;
  while (k > 16 && k * D * itemsize > (int64_t{256} << 10)) k /= 2;
  return k;
}

// A unit of parallel work. slot < 0: the classes [c0, c1), each with at most K rows, whose
// results go straight to the outputs. slot >= 0: the sorted rows [r0, r1) of the large class c0,
// whose sum and M2 go to the scratch slot `slot` (merged afterwards).
struct Task {
  int64_t c0, c1, r0, r1, slot;
};

// A class with more than K rows: its chunks are the scratch slots [slot0, slot0 + nslots).
struct BigClass {
  int64_t c, slot0, nslots;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_stats_cpu(const at::Tensor& features, const at::Tensor& labels,
                                                               int64_t num_classes, int64_t ignore_index) {
  const char* fn = "class_stats_cpu";
  TORCH_CHECK_VALUE(features.device().is_cpu(), fn, ": features must be a CPU tensor, got ", features.device());
  const auto dtype = features.scalar_type();
  int kind = 0;
  switch (dtype) {
    case at::kFloat: kind = isa_generic::kF32; break;
    case at::kDouble: kind = isa_generic::kF64; break;
    case at::kBFloat16: kind = isa_generic::kBF16; break;
    case at::kHalf: kind = isa_generic::kF16; break;
    default:
      TORCH_CHECK_TYPE(false, fn, ": features must be float32, float16, bfloat16 or float64, got ", dtype);
  }
  TORCH_CHECK_VALUE(features.dim() == 2, fn, ": features must be 2-D (N, D), got shape ", features.sizes());
  TORCH_CHECK_VALUE(features.is_contiguous(), fn, ": features must be contiguous");
  const int64_t N = features.size(0), D = features.size(1), C = num_classes;
  TORCH_CHECK_VALUE(C >= 0, fn, ": num_classes must be >= 0, got ", C);
  nck::check_vector(fn, "labels", labels, N, at::kLong);

  auto i64 = labels.options();
  auto f64 = features.options().dtype(at::kDouble);
  at::Tensor counts = at::empty({C}, i64), sums = at::empty({C, D}, f64), m2 = at::empty({C}, f64);
  int64_t* cnt = counts.data_ptr<int64_t>();
  double* sp = sums.data_ptr<double>();
  double* mp = m2.data_ptr<double>();

  // 1. count (and check) the labels, then a counting sort of the kept rows by label
  const int64_t* y = labels.data_ptr<int64_t>();
  std::fill(cnt, cnt + C, int64_t{0});
  for (int64_t i = 0; i < N; ++i) {
    const int64_t c = y[i];
    if (c == ignore_index) continue;
    TORCH_CHECK_INDEX(c >= 0 && c < C, fn, ": labels[", i, "] = ", c, " is outside [0, ", C,
                      ") and is not ignore_index (", ignore_index, ")");
    ++cnt[c];
  }
  std::vector<int64_t> start(C + 1);
  start[0] = 0;
  for (int64_t c = 0; c < C; ++c) start[c + 1] = start[c] + cnt[c];
  const int64_t kept = start[C];
  std::vector<int64_t> order(kept);
  {
    std::vector<int64_t> pos(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t c = y[i];
      if (c != ignore_index) order[pos[c]++] = i;
    }
  }

  // 2. tasks: runs of small classes, and equal chunks of the classes with more than K rows
  const int64_t K = chunk_rows(D, static_cast<int64_t>(features.element_size()));
  std::vector<Task> tasks;
  std::vector<BigClass> big;
  std::vector<int64_t> slot_rows;  // rows of each scratch slot
  for (int64_t c = 0; c < C;) {
    const int64_t n = cnt[c];
    if (n > K) {
      const int64_t nchunks = (n + K - 1) / K, slot0 = static_cast<int64_t>(slot_rows.size());
      big.push_back({c, slot0, nchunks});
      for (int64_t k = 0; k < nchunks; ++k) {
        const int64_t r0 = start[c] + k * n / nchunks, r1 = start[c] + (k + 1) * n / nchunks;
        tasks.push_back({c, c + 1, r0, r1, slot0 + k});
        slot_rows.push_back(r1 - r0);
      }
      ++c;
      continue;
    }
    // a class costs about one row more than its rows (its output row is zeroed and written)
    const int64_t c0 = c;
    int64_t cost = 0;
    while (c < C && cnt[c] <= K && (c == c0 || cost + cnt[c] + 1 <= K)) cost += cnt[c++] + 1;
    tasks.push_back({c0, c, start[c0], start[c], -1});
  }
  const int64_t nslots = static_cast<int64_t>(slot_rows.size());
  std::vector<double> slot_sum(static_cast<size_t>(nslots * D)), slot_m2(nslots);

  // 3. every task, then 4. the merge of the large classes' chunks
  const auto& kern = class_stats_kernels();
  const ChunkFn chunk = kern.chunk[kind];
  const void* x = features.data_ptr();
  const int64_t* ord = order.data();
  const int64_t ntasks = static_cast<int64_t>(tasks.size()), nbig = static_cast<int64_t>(big.size());
  const int threads = at::get_num_threads();
  const bool parallel = ntasks > 1 && (kept + C) * std::max<int64_t>(D, 1) >= (int64_t{1} << 15);
#pragma omp parallel num_threads(threads) if (parallel)
  {
    std::vector<double> buf(static_cast<size_t>(2 * D));  // a class's mean and residual accumulators
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntasks; ++t) {
      const Task& task = tasks[t];
      if (task.slot >= 0) {
        chunk(x, D, ord + task.r0, task.r1 - task.r0, task.r1 - task.r0, slot_sum.data() + task.slot * D,
              &slot_m2[task.slot], buf.data());
      } else {
        for (int64_t c = task.c0; c < task.c1; ++c)
          chunk(x, D, ord + start[c], cnt[c], task.r1 - start[c], sp + c * D, mp + c, buf.data());
      }
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < nbig; ++b) {
      const BigClass& bc = big[b];
      mp[bc.c] = kern.merge(slot_sum.data() + bc.slot0 * D, slot_m2.data() + bc.slot0, slot_rows.data() + bc.slot0,
                            bc.nslots, D, sp + bc.c * D, buf.data());
    }
  }
  return {counts, sums, m2};
}

}  // namespace

namespace nck {

void init_class_stats(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("class_stats_cpu", &class_stats_cpu, py::arg("features"), py::arg("labels"), py::arg("num_classes"),
        py::arg("ignore_index"),
        "Per-class (counts, sums, m2) of CPU features (N, D) (float32, float16, bfloat16 or float64,\n"
        "contiguous) grouped by int64 labels (N,); rows labelled ignore_index are skipped, other labels\n"
        "must lie in [0, num_classes) (IndexError otherwise).\n"
        "counts: int64 (C,); sums: float64 (C, D), each class's sum of rows; m2: float64 (C,), each\n"
        "class's sum of ||h - mean_c||^2 about its own mean (two passes in double over chunks of at most\n"
        "class_stats_chunk_rows(D, itemsize) rows, merged exactly with Chan's formula). Empty classes are\n"
        "0 everywhere. Outputs are new tensors; results do not depend on the number of threads.");
  m.def("class_stats_chunk_rows", &chunk_rows, py::arg("D"), py::arg("itemsize"),
        "Rows per chunk of class_stats_cpu for D features of itemsize bytes: 256, halved while a chunk\n"
        "takes more than 256 KiB, at least 16 (classes with more rows are split and merged).");
}

}  // namespace nck

#else  // NCK_CLASS_STATS_KERNELS: the kernels, compiled once per instruction set

namespace NCK_ISA {

enum Kind { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3, kNumKinds = 4 };

static inline float f32_from_bits(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}
static inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  return u;
}

template <int K>
struct Elem;
template <>
struct Elem<kF32> {
  using T = float;
  static inline double get(T v) { return static_cast<double>(v); }
};
template <>
struct Elem<kF64> {
  using T = double;
  static inline double get(T v) { return v; }
};
template <>
struct Elem<kBF16> {
  using T = uint16_t;
  static inline double get(T v) { return static_cast<double>(f32_from_bits(static_cast<uint32_t>(v) << 16)); }
};
template <>
struct Elem<kF16> {
  using T = uint16_t;
  // IEEE half -> float without branches (so that it vectorises), as in the FP16 library
  // (fp16_ieee_to_fp32_value): exact for normals, subnormals, zeros, infinities and NaNs.
  static inline double get(T h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t bits = sign | (two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized));
    return static_cast<double>(f32_from_bits(bits));
  }
};

// sum_{d < D} v[d] in 8 interleaved partial sums (vectorised; the same order on every instruction set).
static inline double sum_lanes(const double* __restrict v, int64_t D) {
  double lane[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int l = 0; l < 8; ++l) lane[l] += v[d + l];
  for (int l = 0; l < 8 && d + l < D; ++l) lane[l] += v[d + l];
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// The first pass prefetches the rows kAhead rows ahead (rows are scattered: the hardware
// prefetchers would not fetch a row before its first cache misses); at most 4 KiB of each.
constexpr int64_t kAhead = 8;
template <typename T>
static inline void prefetch_rows(const T* x, int64_t D, const int64_t* rows, int64_t from, int64_t to) {
  const int64_t bytes = D * static_cast<int64_t>(sizeof(T));
  const int64_t end = bytes < 4096 ? bytes : 4096;
  for (int64_t j = from; j < to; ++j) {
    const char* p = reinterpret_cast<const char*>(x + rows[j] * D);
    for (int64_t o = 0; o < end; o += 64) __builtin_prefetch(p + o);
  }
}

// mean[0..D) <- sum / n and acc[0..D) <- 0: the set-up of a pass of squared residuals about the mean.
static inline void start_residuals(const double* __restrict sum, int64_t n, int64_t D, double* __restrict mean,
                                   double* __restrict acc) {
  const double dn = static_cast<double>(n);
  for (int64_t d = 0; d < D; ++d) {
    mean[d] = sum[d] / dn;
    acc[d] = 0.0;
  }
}

// Sum and M2 (about their own mean) of the n rows x[rows[i] * D .. + D) in double:
// sum[0..D) <- the sum, *m2 <- sum_i ||x_i - sum / n||^2 (0 when n <= 1). buf: 2 D doubles.
// rows[0..ahead) may be read (ahead >= n): the rows past n are only prefetched.
// Two passes; rows are taken four at a time so that the D-long accumulators are loaded and
// stored once per four rows.
template <int K>
static void chunk_stats(const void* xv, int64_t D, const int64_t* __restrict rows, int64_t n, int64_t ahead,
                        double* __restrict sum, double* __restrict m2, double* __restrict buf) {
  using E = Elem<K>;
  using T = typename E::T;
  const T* __restrict x = static_cast<const T*>(xv);
  for (int64_t d = 0; d < D; ++d) sum[d] = 0.0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const int64_t p1 = i + kAhead + 4 < ahead ? i + kAhead + 4 : ahead;
    if (i + kAhead < p1) prefetch_rows(x, D, rows, i + kAhead, p1);
    const T* __restrict a = x + rows[i] * D;
    const T* __restrict b = x + rows[i + 1] * D;
    const T* __restrict c = x + rows[i + 2] * D;
    const T* __restrict e = x + rows[i + 3] * D;
    for (int64_t d = 0; d < D; ++d) sum[d] += (E::get(a[d]) + E::get(b[d])) + (E::get(c[d]) + E::get(e[d]));
  }
  for (; i < n; ++i) {
    if (i + kAhead < ahead) prefetch_rows(x, D, rows, i + kAhead, i + kAhead + 1);
    const T* __restrict a = x + rows[i] * D;
    for (int64_t d = 0; d < D; ++d) sum[d] += E::get(a[d]);
  }
  if (n <= 1) {
    *m2 = 0.0;
    return;
  }
  double* __restrict mean = buf;
  double* __restrict acc = buf + D;
  start_residuals(sum, n, D, mean, acc);
  for (i = 0; i + 4 <= n; i += 4) {
    const T* __restrict a = x + rows[i] * D;
    const T* __restrict b = x + rows[i + 1] * D;
    const T* __restrict c = x + rows[i + 2] * D;
    const T* __restrict e = x + rows[i + 3] * D;
    for (int64_t d = 0; d < D; ++d) {
      const double ra = E::get(a[d]) - mean[d], rb = E::get(b[d]) - mean[d];
      const double rc = E::get(c[d]) - mean[d], re = E::get(e[d]) - mean[d];
      acc[d] += (ra * ra + rb * rb) + (rc * rc + re * re);
    }
  }
  for (; i < n; ++i) {
    const T* __restrict a = x + rows[i] * D;
    for (int64_t d = 0; d < D; ++d) {
      const double r = E::get(a[d]) - mean[d];
      acc[d] += r * r;
    }
  }
  *m2 = sum_lanes(acc, D);
}

// Chan's exact merge of nchunks chunks (sums chunk_sum[k * D .. + D), M2 chunk_m2[k], rows
// chunk_n[k] > 0): sum[0..D) <- the class sum; returns the class M2 =
// sum_k M2_k + sum_k n_k ||sum_k / n_k - sum / n||^2. buf: 2 D doubles.
static double merge_chunks(const double* __restrict chunk_sum, const double* __restrict chunk_m2,
                           const int64_t* __restrict chunk_n, int64_t nchunks, int64_t D, double* __restrict sum,
                           double* __restrict buf) {
  int64_t n = 0;
  for (int64_t d = 0; d < D; ++d) sum[d] = 0.0;
  for (int64_t k = 0; k < nchunks; ++k) {
    const double* __restrict s = chunk_sum + k * D;
    for (int64_t d = 0; d < D; ++d) sum[d] += s[d];
    n += chunk_n[k];
  }
  double* __restrict mean = buf;
  double* __restrict acc = buf + D;
  start_residuals(sum, n, D, mean, acc);
  double m2 = 0.0;
  for (int64_t k = 0; k < nchunks; ++k) {
    const double* __restrict s = chunk_sum + k * D;
    const double nk = static_cast<double>(chunk_n[k]);
    for (int64_t d = 0; d < D; ++d) {
      const double r = s[d] / nk - mean[d];
      acc[d] += nk * (r * r);
    }
    m2 += chunk_m2[k];
  }
  return m2 + sum_lanes(acc, D);
}

}  // namespace NCK_ISA

#endif  // NCK_CLASS_STATS_KERNELS
