"""Test stand-in for flash-attn (GPU-only): names openrlhf imports, nothing that runs. See ../README.md."""
