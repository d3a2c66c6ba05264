"""Kernel tests: Triton kernels (interpreted on CPU), the CUDA select/unmask op and its torch registration."""
