"""Stand-in for ``flash_attn.bert_padding``: CPU twins of flash-attn's padding helpers, so that openrlhf's
``--ds.packing_samples`` path (``openrlhf.models.ring_attn_utils.unpad_and_slice_tensor`` and
``gather_and_pad_tensor``) runs in the tests. Written from the documented contract (the real ones are plain
PyTorch too); ``test_standins.py`` checks them against a loop over the batch."""

import torch
from einops import rearrange  # flash-attn re-exports einops' rearrange from this module

__all__ = ["index_first_axis", "pad_input", "rearrange", "unpad_input"]


def index_first_axis(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``values[indices]`` along the first axis (differentiable)."""
    return values[indices]


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask=None):
    """``[B, S, ...]`` + ``attention_mask [B, S]`` -> ``(the N attended rows [N, ...], their flat indices [N],
    cu_seqlens [B+1] int32, max_seqlen int, seqlens [B] int32)``, rows in batch order."""
    if unused_mask is not None:
        raise NotImplementedError("the test stand-in implements unpad_input without unused_mask")
    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, int(seqlens.max()), seqlens


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """The inverse of `unpad_input`: rows ``[N, ...]`` at flat ``indices`` -> ``[batch, seqlen, ...]``, zeros
    elsewhere (differentiable)."""
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out = out.index_put((indices,), hidden_states)
    return out.view(batch, seqlen, *hidden_states.shape[1:])
