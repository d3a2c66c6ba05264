// The select/unmask step of one denoise step as a plain CUDA launcher: no torch headers, so
// select_unmask.cu compiles with nvcc alone and bindings.cpp holds all of the torch glue.
// Semantics: kernels/select.py (the Triton twin and the torch reference).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace nemotron_fast {

// Element type of the confidences.
enum ConfDtype : int { kConfFloat32 = 0, kConfFloat16 = 1, kConfBFloat16 = 2 };

// threshold: most confident candidate + every candidate with conf >= threshold;
// top_k: the k[b] best candidates; all: every candidate (finish_last_step).
enum SelectMode : int { kSelectThreshold = 0, kSelectTopK = 1, kSelectAll = 2 };

// Positions of a row the launcher accepts: the conf row and the candidate flags live in shared memory.
constexpr int64_t kSelectMaxLength = 8192;

// Strides are in elements. Every [B, L] tensor is indexed as ptr[b * stride[0] + i * stride[1]].
struct SelectUnmaskArgs {
  const int64_t* x0;       // [B, L] proposed tokens
  const void* conf;        // [B, L] confidences, conf_dtype
  int64_t* block;          // [B, L] current tokens, written where revealed
  bool* is_mask;           // [B, L] mask flags, cleared where revealed
  const void* k;           // [B] tokens to reveal (top_k mode only), int64 or int32 (k_is_int32)
  const bool* active;      // [B] rows that take part, or nullptr for all rows
  bool* revealed;          // [B, L] output, contiguous
  int64_t batch;
  int64_t length;
  int64_t stride_x0[2];
  int64_t stride_conf[2];
  int64_t stride_block[2];
  int64_t stride_mask[2];
  int64_t stride_k;
  int64_t stride_active;
  int conf_dtype;          // ConfDtype
  int mode;                // SelectMode
  float threshold;         // already rounded to conf_dtype (exact in float)
  bool k_is_int32;
};

// Enqueues one block per row on `stream`; returns the launch status (cudaErrorInvalidValue for bad
// arguments) without synchronising.
cudaError_t launch_select_unmask(const SelectUnmaskArgs& args, cudaStream_t stream);

}  // namespace nemotron_fast
