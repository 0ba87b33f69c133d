"""alignops: fused kernels for reinforcement-learning alignment of language models.

`import alignops` never initialises CUDA and never compiles anything: alignops._C and the Triton
kernels are loaded on first use.
"""

from alignops._backend import BACKENDS, BackendUnavailableError, available_backends
from alignops.token_logprobs import token_logprobs

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendUnavailableError", "available_backends", "token_logprobs"]
