"""The `torch` backend of the kernel ops: eager PyTorch, float64-capable, at the same relative path
as each op's cpu (csrc/cpu/) and triton (kernels/) implementation. Gradients come from autograd or
from the same formulas the kernels use; the independent float64 oracles of the tests are in tests/."""
