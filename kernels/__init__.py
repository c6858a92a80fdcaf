"""Triton kernels (no autograd, no loss logic). Importable as ``flowloss.kernels``."""
