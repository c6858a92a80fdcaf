"""The log-Z head in verl's packed layout: pooled prompt hidden states -> ``log Z [B]``, inside the forward.

`attach_log_z_head` adds a `flowloss.LogZHead` to the Hugging Face model before FSDP wraps it; a forward hook on
the decoder computes ``log Z`` from the last hidden state *inside* the model's forward (so FSDP has the head's
parameters gathered) for the micro-batch layout the engine records (`_HeadContext`). Gradients flow from the head
into the LLM (no detach), as in the authors' code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flowloss import LogZHead, pool_prompt_hidden_states
from flowloss.adapters.common import HiddenStateCapture, LogZHeadOptions
from flowloss.adapters.common import attach_log_z_head as _attach_head
from flowloss.adapters.verl.config import FlowRLConfig

__all__ = ["attach_log_z_head", "packed_prompt_log_z", "prompt_and_sequence_lengths"]


def packed_prompt_log_z(
    head: LogZHead,
    hidden_states: torch.Tensor,
    prompt_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    drop_last_prompt_token: bool = False,
) -> torch.Tensor:
    """``log Z`` from packed (padding-free) hidden states: ``[1, N, H]`` or ``[N, H]`` -> ``[B]``.

    Sequence ``i`` occupies ``seq_lens[i]`` consecutive rows (prompt first, ``prompt_lens[i]`` tokens), as in
    verl's remove-padding layout; rows past ``sum(seq_lens)`` (verl's static pad suffix) are ignored. The
    prompt rows are gathered into ``[B, P, H]`` with a mask and pooled by
    `pool_prompt_hidden_states`; the head maps ``[B, H] -> [B]``.
    """
    h = hidden_states.squeeze(0) if hidden_states.dim() == 3 else hidden_states
    prompt_lens = prompt_lens.to(device=h.device, dtype=torch.long)
    seq_lens = seq_lens.to(device=h.device, dtype=torch.long)
    bad_prompt = bool((prompt_lens < 1).any())
    if prompt_lens.shape != seq_lens.shape or int(seq_lens.sum()) > h.shape[0] or bad_prompt:
        raise ValueError(
            f"packed layout mismatch: seq_lens {seq_lens.tolist()} sum to {int(seq_lens.sum())} rows, hidden "
            f"states have {h.shape[0]} (shape {tuple(hidden_states.shape)}); prompt_lens {prompt_lens.tolist()} "
            "(>= 1)"
        )
    starts = torch.cumsum(seq_lens, 0) - seq_lens
    width = max(int(prompt_lens.max()) if prompt_lens.numel() else 0, 1)
    offsets = torch.arange(width, device=h.device)
    prompt_mask = offsets.unsqueeze(0) < prompt_lens.unsqueeze(1)  # [B, P]
    rows = (starts.unsqueeze(1) + offsets.unsqueeze(0)).clamp_max(h.shape[0] - 1)  # [B, P]
    gathered = h[rows]  # [B, P, H]
    pooled = pool_prompt_hidden_states(gathered, prompt_mask, drop_last_token=drop_last_prompt_token)
    return head(pooled)


class _HeadContext:
    """The current micro-batch's prompt layout, set by the engine, and the hook that computes log Z from it."""

    def __init__(self, model: nn.Module, head: LogZHead, options: LogZHeadOptions) -> None:
        self.prompt_lens: torch.Tensor | None = None  # [B]
        self.seq_lens: torch.Tensor | None = None  # [B]
        self.capture = HiddenStateCapture(model, transform=self._log_z)
        self._head, self._drop_last = head, options.drop_last_prompt_token

    def _log_z(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.prompt_lens is not None and self.seq_lens is not None
        return packed_prompt_log_z(self._head, hidden, self.prompt_lens, self.seq_lens,
                                   drop_last_prompt_token=self._drop_last)

    def set_layout(self, prompt_lens: torch.Tensor, seq_lens: torch.Tensor) -> None:
        self.prompt_lens, self.seq_lens = prompt_lens, seq_lens
        self.capture.start()

    def take_log_z(self) -> torch.Tensor | None:
        """The ``[B]`` log Z of the forward that just ran (None if none ran); the layout is used up."""
        log_z = self.capture.pop() if self.capture.captured else None
        self.capture.stop()
        self.prompt_lens = self.seq_lens = None
        return log_z


def attach_log_z_head(
    model: nn.Module, flowrl: FlowRLConfig | dict[str, Any] | None = None
) -> tuple[LogZHead, _HeadContext]:
    """Add a `LogZHead` to a Hugging Face causal LM as ``model.flowrl_log_z_head``; return it and its context.

    Do it before FSDP wrapping so the head is sharded, optimized (with the policy's optimizer: in the policy's
    group, or in its own at ``log_z_lr``) and saved with the model (`flowloss.adapters.common.attach_log_z_head`;
    ``log_z_zero_init`` starts log Z at exactly ``log_z_init``). A forward hook on the decoder computes ``log Z``
    from its last hidden state *inside* the model's forward (so FSDP has the head's parameters gathered), for
    the prompt layout given to ``ctx.set_layout(prompt_lens, seq_lens)``; ``ctx.take_log_z()`` returns it.
    Gradients flow from the head into the LLM (no detach), as in the reference code.
    """
    options = FlowRLConfig.from_any(flowrl).log_z_head
    head = _attach_head(model, options)
    return head, _HeadContext(model, head, options)


def prompt_and_sequence_lengths(micro_batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence prompt and total lengths of a verl micro-batch (nested or left/right-padded layout)."""
    prompts, responses = micro_batch["prompts"], micro_batch["responses"]
    if prompts.is_nested:
        prompt_lens = prompts.offsets().diff()
        response_lens = responses.offsets().diff()
    else:
        attention_mask = micro_batch["attention_mask"]
        prompt_lens = attention_mask[:, : prompts.shape[1]].sum(dim=1)
        response_lens = attention_mask[:, prompts.shape[1] :].sum(dim=1)
    return prompt_lens, prompt_lens + response_lens
