"""Test stand-in for vllm (GPU-only): the names openrlhf imports at module level, nothing that runs.

``import vllm`` succeeds so that ``openrlhf.trainer.ray`` imports; no engine can be created, nothing sampled.
"""

__version__ = "0.0.0+flowloss-test-standin"


class SamplingParams:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("vllm.SamplingParams is a test stand-in: generation needs the real vllm")
