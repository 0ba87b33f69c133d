"""The `torch` backend: eager PyTorch written for clarity, float64-capable. It is the oracle that
every other backend is tested against; its gradients come from torch autograd, not from the
analytic formulas the kernels use."""
