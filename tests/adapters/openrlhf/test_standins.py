"""The CPU twins of flash-attn's padding helpers (``standins/flash_attn/bert_padding.py``) keep its contract:
attended rows in batch order, ``cu_seqlens`` their running lengths, ``pad_input`` the exact inverse."""

from __future__ import annotations

import importlib.util

import pytest
import torch


@pytest.fixture()
def bert_padding(adapter):
    spec = importlib.util.find_spec("flash_attn")
    if spec is None or "standins" not in str(spec.origin):
        pytest.skip("the real flash-attn is installed: no stand-in to check")
    from flash_attn import bert_padding

    return bert_padding


def test_unpad_and_pad_follow_flash_attn_contract(bert_padding):
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]])
    x = torch.randn(3, 6, 4, generator=g, requires_grad=True)
    rows, indices, cu_seqlens, max_seqlen, seqlens = bert_padding.unpad_input(x, mask)
    expected = torch.cat([x[b][mask[b].bool()] for b in range(3)])  # row by row, in order
    assert torch.equal(rows, expected)
    assert indices.tolist() == [b * 6 + s for b in range(3) for s in range(6) if mask[b, s]]
    assert cu_seqlens.tolist() == [0, 3, 9, 11] and cu_seqlens.dtype == torch.int32
    assert max_seqlen == 6 and seqlens.tolist() == [3, 6, 2]
    back = bert_padding.pad_input(rows, indices, 3, 6)
    assert torch.equal(back, x * mask[..., None])
    back.sum().backward()
    assert torch.equal(x.grad, mask[..., None].expand_as(x).float())
    assert torch.equal(bert_padding.index_first_axis(x.reshape(18, 4), indices), rows)


def test_openrlhf_packing_round_trip(bert_padding):
    """OpenRLHF's own unpad/gather helpers on the twins: packed [1, N] sequences, positions restarting per
    sample, labels = the next token of the same sample, and back to [B, S]."""
    from openrlhf.models.ring_attn_utils import gather_and_pad_tensor, unpad_and_slice_tensor

    seq = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    packed, positions, rolled, pad, indices = unpad_and_slice_tensor(seq, mask, None)
    assert packed.tolist() == [[5, 6, 7, 8, 9, 10, 11]] and positions.tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert rolled.tolist() == [[6, 7, 0, 9, 10, 11, 0]] and pad == 0
    assert gather_and_pad_tensor(packed, None, 0, indices, 2, 5).tolist() == (seq * mask).tolist()
