"""Triton kernels of alignops, installed as the subpackage `alignops.kernels`.

Modules here are imported lazily by the kernel registry (alignops._backend), never by
`import alignops`: importing triton is slow and must not happen for users of other backends.
"""
