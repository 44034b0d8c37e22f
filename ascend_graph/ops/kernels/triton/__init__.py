"""Triton (CUDA) kernels of the fused ops. Imported lazily: Triton is only needed on CUDA."""
