"""Stand-in for ``flash_attn.bert_padding``: openrlhf's packing path (``--ds.packing_samples``) only."""

from einops import rearrange  # flash-attn re-exports einops' rearrange from this module

__all__ = ["index_first_axis", "pad_input", "rearrange", "unpad_input"]


def _unavailable(name: str):
    def fn(*args, **kwargs):
        raise RuntimeError(f"flash_attn.bert_padding.{name} is a test stand-in: packing needs flash-attn")

    fn.__name__ = name
    return fn


index_first_axis = _unavailable("index_first_axis")
pad_input = _unavailable("pad_input")
unpad_input = _unavailable("unpad_input")
