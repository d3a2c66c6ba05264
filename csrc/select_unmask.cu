// CUDA select/unmask: one thread block per row. The row's confidences and candidate flags are staged in
// shared memory; the threshold mode finds the forced top-1 with warp-shuffle argmax reductions, the top-k
// mode ranks each candidate against the row (a stable descending sort: ties go to the lower position).
#include "select_unmask.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace nemotron_fast {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// (value, index) argmax step: a higher value wins, equal values go to the lower index, -1 means "none".
__device__ __forceinline__ void argmax_merge(float& v, int& i, float v2, int i2) {
  if (i2 >= 0 && (i < 0 || v2 > v || (v2 == v && i2 < i))) {
    v = v2;
    i = i2;
  }
}

__device__ __forceinline__ void warp_argmax(float& v, int& i) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float v2 = __shfl_down_sync(kFullMask, v, offset);
    const int i2 = __shfl_down_sync(kFullMask, i, offset);
    argmax_merge(v, i, v2, i2);
  }
}

// Lowest position among the most confident candidates of the row, or -1; every thread gets the answer.
__device__ int block_top1(const float* conf, const unsigned char* cand, int length) {
  __shared__ float warp_v[32];
  __shared__ int warp_i[32];
  __shared__ int top;
  float v = 0.0f;
  int idx = -1;
  for (int i = threadIdx.x; i < length; i += blockDim.x) {
    if (cand[i]) argmax_merge(v, idx, conf[i], i);
  }
  warp_argmax(v, idx);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_v[warp] = v;
    warp_i[warp] = idx;
  }
  __syncthreads();
  if (warp == 0) {
    const int n_warps = (blockDim.x + 31) / 32;
    v = lane < n_warps ? warp_v[lane] : 0.0f;
    idx = lane < n_warps ? warp_i[lane] : -1;
    warp_argmax(v, idx);
    if (lane == 0) top = idx;
  }
  __syncthreads();
  return top;
}

template <typename T>
__global__ void select_unmask_kernel(SelectUnmaskArgs a) {
  extern __shared__ float smem[];
  const int length = static_cast<int>(a.length);
  float* conf_s = smem;
  unsigned char* cand_s = reinterpret_cast<unsigned char*>(smem + length);
  const int64_t b = blockIdx.x;
  const T* conf = static_cast<const T*>(a.conf);
  const bool row_active = a.active == nullptr || a.active[b * a.stride_active];

  for (int i = threadIdx.x; i < length; i += blockDim.x) {
    cand_s[i] = row_active && a.is_mask[b * a.stride_mask[0] + i * a.stride_mask[1]];
    conf_s[i] = to_float(conf[b * a.stride_conf[0] + i * a.stride_conf[1]]);
  }
  __syncthreads();

  int top = -1;
  int64_t k = 0;
  if (a.mode == kSelectThreshold) {
    top = block_top1(conf_s, cand_s, length);
  } else if (a.mode == kSelectTopK) {
    k = a.k_is_int32 ? static_cast<const int32_t*>(a.k)[b * a.stride_k]
                     : static_cast<const int64_t*>(a.k)[b * a.stride_k];
  }

  for (int i = threadIdx.x; i < length; i += blockDim.x) {
    bool reveal = cand_s[i];
    if (reveal && a.mode == kSelectThreshold) {
      // Both sides are exact in float, so this is the comparison in the confidences' dtype.
      reveal = i == top || conf_s[i] >= a.threshold;
    } else if (reveal && a.mode == kSelectTopK) {
      const float c = conf_s[i];
      int64_t rank = 0;
      for (int j = 0; j < length && rank < k; ++j) {
        rank += cand_s[j] && (conf_s[j] > c || (conf_s[j] == c && j < i));
      }
      reveal = rank < k;
    }
    a.revealed[b * length + i] = reveal;
    if (reveal) {
      a.block[b * a.stride_block[0] + i * a.stride_block[1]] = a.x0[b * a.stride_x0[0] + i * a.stride_x0[1]];
      a.is_mask[b * a.stride_mask[0] + i * a.stride_mask[1]] = false;
    }
  }
}

}  // namespace

cudaError_t launch_select_unmask(const SelectUnmaskArgs& args, cudaStream_t stream) {
  if (args.batch < 0 || args.length < 0 || args.length > kSelectMaxLength) return cudaErrorInvalidValue;
  if (args.mode < kSelectThreshold || args.mode > kSelectAll) return cudaErrorInvalidValue;
  if (args.mode == kSelectTopK && args.k == nullptr) return cudaErrorInvalidValue;
  if (args.batch == 0 || args.length == 0) return cudaSuccess;
  const int threads = static_cast<int>(args.length >= 1024 ? 1024 : ((args.length + 31) / 32) * 32);
  const size_t shmem = static_cast<size_t>(args.length) * (sizeof(float) + 1);
  const dim3 grid(static_cast<unsigned>(args.batch));
  switch (args.conf_dtype) {
    case kConfFloat32:
      select_unmask_kernel<float><<<grid, threads, shmem, stream>>>(args);
      break;
    case kConfFloat16:
      select_unmask_kernel<__half><<<grid, threads, shmem, stream>>>(args);
      break;
    case kConfBFloat16:
      select_unmask_kernel<__nv_bfloat16><<<grid, threads, shmem, stream>>>(args);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace nemotron_fast
