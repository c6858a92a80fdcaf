"""Stand-in for ``vllm.utils``."""


def random_uuid() -> str:
    raise RuntimeError("vllm.utils.random_uuid is a test stand-in: generation needs the real vllm")
