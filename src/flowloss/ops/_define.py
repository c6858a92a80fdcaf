"""``define_op``: one ``flowloss::`` operator from a schema and a Python kernel, without ``torch.library.custom_op``.

``torch.library.define`` + ``torch.library.impl(..., "CompositeExplicitAutograd")`` give the operator Dynamo and the
dispatcher see with ``custom_op``, without the latter's wrapper, whose first call imports ``torch._dynamo`` (and
with it Inductor, sympy and triton: ~190 MB of resident memory and seconds on the first call of an eager run).
Fake (meta) kernels and autograd are registered on the qualified name (``torch.library.register_fake`` /
``register_autograd``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def define_op(schema: str) -> Callable[[Callable[..., Any]], Any]:
    """Decorator: define ``flowloss::<schema>`` and make the function its kernel on every backend; returns the
    ``OpOverload`` (called like the function)."""
    name, args = schema.split("(", 1)
    qualname = f"flowloss::{name}"

    def register(fn: Callable[..., Any]) -> Any:
        torch.library.define(qualname, "(" + args)
        torch.library.impl(qualname, "CompositeExplicitAutograd")(fn)
        return getattr(torch.ops.flowloss, name).default

    return register
