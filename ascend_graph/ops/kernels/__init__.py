"""Device implementations of the fused ops: ``triton/`` (CUDA) and ``npu/`` (torch_npu)."""
