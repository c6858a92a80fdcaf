"""Stand-in for ``vllm.inputs``."""


class TokensPrompt(dict):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("vllm.inputs.TokensPrompt is a test stand-in: generation needs the real vllm")
