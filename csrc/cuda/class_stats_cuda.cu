// Per-class statistics on CUDA (DESIGN.md family 2): the CUDA twin of kernels/segment.py.
//
//   class_stats_cuda(features, perm, ends, chunk_end, chunk_cls, multi_end, multi_cls, chunk,
//                    sums, m2, part, part_m2)
//
// The caller (nckernels/ops/collapse.py) sorts the rows by label and builds the chunk plan with
// torch ops, without a host synchronisation: class c owns the sorted rows perm[ends[c], ends[c+1])
// and is cut into ceil(n_c / chunk) chunks of at most `chunk` rows; chunk k belongs to class
// chunk_cls[k] (chunk_end = cumulative chunks per class; its last entry is the number of chunks,
// read on the device). `sums` and `m2` arrive zeroed, so empty classes need no work.
//
// Kernel 1 (chunk_stats): one block per chunk, grid-stride. The block stages the chunk's row
// indices in shared memory; each thread owns columns d = tid, tid + blockDim, ... and computes, in
// double, the column sum and the sum of squared deviations about the chunk's own mean (two passes
// over at most `chunk` rows: the second one hits L1/L2). The per-thread M2 shares are added by a
// fixed-order tree reduction. A class with one chunk is final: its sum row and M2 go straight to
// the outputs. A class with several chunks writes them to the partial buffers at slot
// ends[c] / chunk + j + g (g: its ordinal among multi-chunk classes; slots are distinct).
// Kernel 2 (merge): one block per multi-chunk class; Chan's formula over its k chunks,
//   S_c = sum_j P_j,  M2_c = sum_j q_j + sum_j ||P_j - n_j mu_c||^2 / n_j,  mu_c = S_c / n_c,
// each column by its own thread in a fixed order, then the same tree reduction.
// Every output element has one writer and every sum a fixed order: deterministic, no atomics.

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int kThreads = 256;
constexpr int kMaxChunk = 64;

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Sum of `value` over the block, in a fixed order; the result is valid in thread 0.
__device__ double block_sum(double value, double* scratch) {
  const int tid = threadIdx.x;
  scratch[tid] = value;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (tid < width) scratch[tid] += scratch[tid + width];
    __syncthreads();
  }
  const double total = scratch[0];
  __syncthreads();  // scratch is reused by the next call
  return total;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) chunk_stats_kernel(
    const scalar_t* __restrict__ x, int64_t stride_n, int64_t stride_d, const int64_t* __restrict__ perm,
    const int64_t* __restrict__ ends, const int64_t* __restrict__ chunk_end, const int64_t* __restrict__ chunk_cls,
    const int64_t* __restrict__ multi_end, int64_t num_classes, int64_t D, int64_t chunk, double* __restrict__ sums,
    double* __restrict__ m2, double* __restrict__ part, double* __restrict__ part_m2) {
  __shared__ int64_t rows[kMaxChunk];
  __shared__ double scratch[kThreads];
  const int64_t total = chunk_end[num_classes - 1];
  for (int64_t k = blockIdx.x; k < total; k += gridDim.x) {
    const int64_t c = chunk_cls[k];
    const int64_t seg_start = ends[c];
    const int64_t count = ends[c + 1] - seg_start;
    const int64_t n_chunks = (count + chunk - 1) / chunk;
    const int64_t j = k - (chunk_end[c] - n_chunks);
    const int64_t start = seg_start + j * chunk;
    const int64_t length = imin(count - j * chunk, chunk);
    const bool single = n_chunks == 1;
    const int64_t slot = seg_start / chunk + j + (multi_end[c] - 1);
    double* out = single ? sums + c * D : part + slot * D;
    if (threadIdx.x < length) rows[threadIdx.x] = perm[start + threadIdx.x] * stride_n;
    __syncthreads();
    const double inv_n = 1.0 / static_cast<double>(length);
    double q = 0.0;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) {
      const scalar_t* col = x + d * stride_d;
      double s = 0.0;
      for (int64_t r = 0; r < length; ++r) s += static_cast<double>(col[rows[r]]);
      const double mean = s * inv_n;
      double dev2 = 0.0;
      for (int64_t r = 0; r < length; ++r) {
        const double v = static_cast<double>(col[rows[r]]) - mean;
        dev2 += v * v;
      }
      out[d] = s;
      q += dev2;
    }
    q = block_sum(q, scratch);  // also orders the reads of `rows` before the next chunk's writes
    if (threadIdx.x == 0) {
      if (single) {
        m2[c] = q;
      } else {
        part_m2[slot] = q;
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads) merge_kernel(
    const int64_t* __restrict__ ends, const int64_t* __restrict__ multi_end, const int64_t* __restrict__ multi_cls,
    int64_t num_classes, int64_t D, int64_t chunk, const double* __restrict__ part,
    const double* __restrict__ part_m2, double* __restrict__ sums, double* __restrict__ m2) {
  __shared__ double scratch[kThreads];
  const int64_t total = multi_end[num_classes - 1];
  for (int64_t g = blockIdx.x; g < total; g += gridDim.x) {
    const int64_t c = multi_cls[g];
    const int64_t count = ends[c + 1] - ends[c];
    const int64_t n_chunks = (count + chunk - 1) / chunk;
    const int64_t first = ends[c] / chunk + g;
    const double inv_count = 1.0 / static_cast<double>(count);
    double acc = 0.0;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) {
      double s = 0.0;
      for (int64_t j = 0; j < n_chunks; ++j) s += part[(first + j) * D + d];
      const double mean = s * inv_count;
      for (int64_t j = 0; j < n_chunks; ++j) {
        const double n_j = static_cast<double>(imin(count - j * chunk, chunk));
        const double dev = part[(first + j) * D + d] - n_j * mean;
        acc += dev * dev / n_j;
      }
      sums[c * D + d] = s;
    }
    if (threadIdx.x == 0) {
      for (int64_t j = 0; j < n_chunks; ++j) acc += part_m2[first + j];
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) m2[c] = acc;
  }
}

void check_int64(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kLong && t.is_contiguous(), name,
              " must be a contiguous int64 CUDA tensor");
}

void class_stats_cuda(const at::Tensor& features, const at::Tensor& perm, const at::Tensor& ends,
                      const at::Tensor& chunk_end, const at::Tensor& chunk_cls, const at::Tensor& multi_end,
                      const at::Tensor& multi_cls, int64_t chunk, at::Tensor sums, at::Tensor m2, at::Tensor part,
                      at::Tensor part_m2) {
  TORCH_CHECK(features.is_cuda() && features.dim() == 2, "features must be a 2-D CUDA tensor");
  TORCH_CHECK(chunk >= 1 && chunk <= kMaxChunk, "chunk must be in [1, ", kMaxChunk, "], got ", chunk);
  for (const auto& [t, name] : {std::pair{perm, "perm"}, {ends, "ends"}, {chunk_end, "chunk_end"},
                                {chunk_cls, "chunk_cls"}, {multi_end, "multi_end"}, {multi_cls, "multi_cls"}}) {
    check_int64(t, name);
  }
  for (const auto& [t, name] : {std::pair{sums, "sums"}, {m2, "m2"}, {part, "part"}, {part_m2, "part_m2"}}) {
    TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kDouble && t.is_contiguous(), name,
                " must be a contiguous float64 CUDA tensor");
  }
  const int64_t C = m2.size(0);
  const int64_t D = features.size(1);
  if (features.size(0) == 0 || C == 0 || D == 0) return;
  const c10::cuda::CUDAGuard guard(features.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, features.get_device()));
  const int blocks_cap = multiprocessors * 8;
  const int chunk_blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(chunk_cls.size(0), blocks_cap)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "class_stats_cuda", [&] {
    chunk_stats_kernel<scalar_t><<<chunk_blocks, kThreads, 0, stream>>>(
        features.data_ptr<scalar_t>(), features.stride(0), features.stride(1), perm.data_ptr<int64_t>(),
        ends.data_ptr<int64_t>(), chunk_end.data_ptr<int64_t>(), chunk_cls.data_ptr<int64_t>(),
        multi_end.data_ptr<int64_t>(), C, D, chunk, sums.data_ptr<double>(), m2.data_ptr<double>(),
        part.data_ptr<double>(), part_m2.data_ptr<double>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (multi_cls.size(0) > 0) {
    const int merge_blocks = static_cast<int>(std::min<int64_t>(multi_cls.size(0), blocks_cap));
    merge_kernel<<<merge_blocks, kThreads, 0, stream>>>(
        ends.data_ptr<int64_t>(), multi_end.data_ptr<int64_t>(), multi_cls.data_ptr<int64_t>(), C, D, chunk,
        part.data_ptr<double>(), part_m2.data_ptr<double>(), sums.data_ptr<double>(), m2.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("class_stats_cuda", &class_stats_cuda,
        "Per-class (sums, m2) of sorted, chunked rows into zeroed outputs (see csrc/cuda/class_stats_cuda.cu)");
}
