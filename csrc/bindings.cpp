// Torch glue of nemotron_fast._C: registers the CUDA kernel of torch.ops.nemotron_fast.select_unmask.
//
// The op's schema is defined once, in Python (nemotron_fast/_ops.py), so that the op exists with a CPU
// implementation and a fake implementation whether or not this extension was built; this file only adds
// the CUDA kernel for the CUDA dispatch key. _ops.py defines the schema before it imports this module.
#include <Python.h>

#include <optional>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "select_unmask.h"

namespace nemotron_fast {
namespace {

void check_2d(const at::Tensor& t, const char* name, const at::Tensor& x0) {
  TORCH_CHECK(t.sizes() == x0.sizes(), "select_unmask: ", name, " has shape ", t.sizes(), " but x0 has ",
              x0.sizes(), "; they must match.");
  TORCH_CHECK(t.device() == x0.device(), "select_unmask: ", name, " is on ", t.device(), " but x0 is on ",
              x0.device(), ".");
}

at::Tensor select_unmask_cuda(const at::Tensor& x0, const at::Tensor& conf, const at::Tensor& block,
                              const at::Tensor& is_mask, const std::optional<at::Tensor>& k,
                              const std::optional<at::Tensor>& active, std::optional<double> threshold,
                              bool force_all) {
  TORCH_CHECK(x0.dim() == 2, "select_unmask: x0 must have shape [B, L], got ", x0.sizes(), ".");
  TORCH_CHECK(x0.is_cuda(), "select_unmask: the CUDA kernel needs CUDA tensors, got x0 on ", x0.device(), ".");
  check_2d(conf, "conf", x0);
  check_2d(block, "block", x0);
  check_2d(is_mask, "is_mask", x0);
  TORCH_CHECK(x0.scalar_type() == at::kLong && block.scalar_type() == at::kLong,
              "select_unmask: x0 and block must be int64 token ids.");
  TORCH_CHECK(is_mask.scalar_type() == at::kBool, "select_unmask: is_mask must be bool, got ",
              is_mask.scalar_type(), ".");
  const int64_t batch = x0.size(0);
  const int64_t length = x0.size(1);
  TORCH_CHECK(length <= kSelectMaxLength, "select_unmask: the CUDA kernel takes blocks of at most ",
              kSelectMaxLength, " positions, got ", length, ".");

  SelectUnmaskArgs args{};
  switch (conf.scalar_type()) {
    case at::kFloat: args.conf_dtype = kConfFloat32; break;
    case at::kHalf: args.conf_dtype = kConfFloat16; break;
    case at::kBFloat16: args.conf_dtype = kConfBFloat16; break;
    default: TORCH_CHECK(false, "select_unmask: conf must be float32, bfloat16 or float16, got ", conf.scalar_type(), ".");
  }
  args.mode = force_all ? kSelectAll : (threshold.has_value() ? kSelectThreshold : kSelectTopK);
  if (args.mode == kSelectThreshold) {
    // Round like torch rounds a Python scalar compared with a tensor of conf's dtype (bf16(0.9) = 0.8984375).
    args.threshold = at::scalar_tensor(*threshold, at::TensorOptions().dtype(conf.scalar_type())).item<float>();
  }
  if (args.mode == kSelectTopK) {
    TORCH_CHECK(k.has_value(), "select_unmask: threshold=None needs k, the number of tokens to reveal per row.");
    TORCH_CHECK(k->dim() == 1 && k->size(0) == batch &&
                    (k->scalar_type() == at::kLong || k->scalar_type() == at::kInt),
                "select_unmask: k must be an int64 or int32 tensor of shape [", batch, "], got ", k->scalar_type(),
                " ", k->sizes(), ".");
    TORCH_CHECK(k->device() == x0.device(), "select_unmask: k is on ", k->device(), " but x0 is on ", x0.device(), ".");
    args.k = k->data_ptr();
    args.stride_k = k->stride(0);
    args.k_is_int32 = k->scalar_type() == at::kInt;
  }
  if (active.has_value()) {
    TORCH_CHECK(active->dim() == 1 && active->size(0) == batch && active->scalar_type() == at::kBool,
                "select_unmask: active must be a bool tensor of shape [", batch, "], got ", active->scalar_type(),
                " ", active->sizes(), ".");
    TORCH_CHECK(active->device() == x0.device(), "select_unmask: active is on ", active->device(),
                " but x0 is on ", x0.device(), ".");
    args.active = active->data_ptr<bool>();
    args.stride_active = active->stride(0);
  }

  const c10::cuda::CUDAGuard guard(x0.device());
  at::Tensor revealed = at::empty({batch, length}, x0.options().dtype(at::kBool));
  args.x0 = x0.data_ptr<int64_t>();
  args.conf = conf.data_ptr();
  args.block = block.data_ptr<int64_t>();
  args.is_mask = is_mask.data_ptr<bool>();
  args.revealed = revealed.data_ptr<bool>();
  args.batch = batch;
  args.length = length;
  args.stride_x0[0] = x0.stride(0);
  args.stride_x0[1] = x0.stride(1);
  args.stride_conf[0] = conf.stride(0);
  args.stride_conf[1] = conf.stride(1);
  args.stride_block[0] = block.stride(0);
  args.stride_block[1] = block.stride(1);
  args.stride_mask[0] = is_mask.stride(0);
  args.stride_mask[1] = is_mask.stride(1);
  const cudaError_t err = launch_select_unmask(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "select_unmask: kernel launch failed: ", cudaGetErrorString(err), ".");
  return revealed;
}

}  // namespace
}  // namespace nemotron_fast

TORCH_LIBRARY_IMPL(nemotron_fast, CUDA, m) { m.impl("select_unmask", &nemotron_fast::select_unmask_cuda); }

// A Python extension module with no Python-level functions: importing it runs the registration above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "CUDA kernels of nemotron_fast.", -1, nullptr,
                               nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
