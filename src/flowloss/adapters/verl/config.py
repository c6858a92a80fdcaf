"""FlowRL's options for verl, where they come from, and the verl settings they cannot run with.

Options are one `FlowRLConfig` (the loss's `flowloss.FlowRLOptions`, the head's
`flowloss.adapters.common.LogZHeadOptions` and verl's three extras). They come from two places, merged key by key:

1. the Python options given to ``register_flowrl(...)`` (in the module named in ``VERL_USE_EXTERNAL_MODULES``);
2. the Hydra node ``actor_rollout_ref.flowrl`` (`FLOWRL_NODE`), e.g. ``+actor_rollout_ref.flowrl.beta=10`` on
   ``main_ppo``'s command line, which wins. It sits beside ``actor``/``ref``/``rollout``/``model`` because verl
   turns ``actor_rollout_ref.actor`` into a dataclass that refuses unknown keys.

`verl_conflicts` lists the verl settings FlowRL's loss would silently ignore (or cannot serve); the FlowRL trainer
raises them all in one error before any worker starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from flowloss.adapters.common import AdapterConfig, Extra

__all__ = ["FLOWRL_NODE", "FlowRLConfig", "check_verl_settings", "flowrl_config_from", "verl_conflicts"]

# Where a Hydra config holds FlowRL's options (flat names, as in FlowRLConfig).
FLOWRL_NODE = "actor_rollout_ref.flowrl"

LogZSource = Literal["head", "vargrad"]
LogprobsPath = Literal["auto", "framework", "logits", "hidden"]
LOGPROBS_PATHS: tuple[str, ...] = ("auto", "framework", "logits", "hidden")


class FlowRLConfig(AdapterConfig):
    """FlowRL options for verl: ``loss`` (`flowloss.FlowRLOptions`), ``log_z_head``
    (`flowloss.adapters.common.LogZHeadOptions`) and verl's own three.

    Flat names (the Hydra node ``actor_rollout_ref.flowrl``, ``FlowRLConfig(beta=15.0)``,
    ``FlowRLConfig.from_any(node)``): the loss's (``beta``, ``importance_weights``, ``eps_low``, ``eps_high``,
    ``max_weight``, ``tis_cap``, ``token_clip_mask``, ``length_normalization``, ...), the head's
    (``log_z_num_layers``, ``log_z_dropout``, ``log_z_init``, ``log_z_zero_init``, ``log_z_lr``,
    ``log_z_drop_last_prompt_token``, ``log_z_dtype``), and

    * ``log_z``: ``"head"`` (the authors' MLP head on pooled prompt hidden states; needs `FlowRLFSDPEngine`)
      or ``"vargrad"`` (parameter-free, TBA arXiv 2503.18929; needs group ids ``data["uid"]``);
    * ``rollout_tis``: multiply ``w`` by ``min(pi_old / pi_rollout, tis_cap)`` from
      ``data["rollout_log_probs"]`` (off by default; the authors' dev variant);
    * ``logprobs``: how `FlowRLFSDPEngine` computes every token log-prob (policy, old policy, reference):
      ``"framework"`` (verl's own path, its fused kernels with ``use_fused_kernels``), ``"logits"``
      (`flowloss.token_logprobs` on the model's logits), ``"hidden"`` (`flowloss.token_logprobs_from_hidden`
      on the last hidden state and the lm_head weight: the ``[tokens, vocab]`` logits are never built) or
      ``"auto"`` (the default: ``"hidden"`` on CPU, where it was measured best; verl's own path on CUDA and
      other accelerators, where no flowloss path has been confirmed inside verl).
    """

    EXTRAS: ClassVar[dict[str, Extra]] = {
        "log_z": Extra("head", "log Z from the head (FlowRLFSDPEngine) or the VarGrad estimate over data['uid']",
                       ("head", "vargrad")),
        "rollout_tis": Extra(False, "truncated IS against data['rollout_log_probs'] (false)"),
        "logprobs": Extra("auto", "token log-probs: auto (hidden on CPU, verl's own on GPUs), framework, logits "
                                  "or hidden", LOGPROBS_PATHS),
    }
    RENAMED: ClassVar[dict[str, str]] = {
        "use_rollout_log_probs": "rollout_tis",
        "drop_last_prompt_token": "log_z_drop_last_prompt_token",
    }
    log_z: LogZSource
    rollout_tis: bool
    logprobs: LogprobsPath


def _node(config: Any, dotted: str) -> Any:
    """``config.a.b`` for a Hydra node, a mapping or an object; None where a key is missing."""
    node = config
    for key in dotted.split("."):
        if node is None:
            return None
        if isinstance(node, Mapping) or hasattr(node, "keys"):
            node = node.get(key) if hasattr(node, "get") else None
        else:
            node = getattr(node, key, None)
    return node


def flowrl_config_from(config: Any, base: FlowRLConfig | Mapping[str, Any] | None = None, *,
                       node: str = FLOWRL_NODE) -> FlowRLConfig:
    """``base`` (the registered options) with the keys of ``config``'s FlowRL node on top.

    ``config`` is ``main_ppo``'s whole config (node ``actor_rollout_ref.flowrl``) or, with ``node="flowrl"``, the
    ``actor_rollout_ref`` part an actor worker receives. Unknown keys raise ``TypeError`` listing the known ones.
    """
    from flowloss.adapters.verl._compat import to_container

    base = FlowRLConfig.from_any(base)
    values = _node(config, node) if config is not None else None
    if values is None:
        return base
    return FlowRLConfig.from_any(base, **to_container(values))


def _get(config: Any, dotted: str, default: Any = None) -> Any:
    value = _node(config, dotted)
    return default if value is None else value


def verl_conflicts(
    flowrl: FlowRLConfig,
    *,
    actor: Any = None,
    algorithm: Any = None,
    model: Any = None,
    replaces_policy_loss: bool = True,
) -> list[str]:
    """The verl settings FlowRL would ignore without a word, or cannot run with; one line each.

    ``actor`` is verl's ``actor_rollout_ref.actor`` (the Hydra node or its ``ActorConfig``), ``algorithm`` and
    ``model`` the ``algorithm`` and ``actor_rollout_ref.model`` nodes; a part that is None is not checked.
    ``replaces_policy_loss``: FlowRL's loss function replaces verl's ``ppo_loss`` (the trainer mode, or
    `make_flowrl_loss_fn`), so ``policy_loss.loss_mode`` is unused too.
    """
    from flowloss.adapters.verl._compat import actor_defaults

    out: list[str] = []
    loss = flowrl.loss
    head = flowrl.log_z_head
    if actor is not None:
        defaults = actor_defaults()
        a = "actor_rollout_ref.actor."
        entropy = float(_get(actor, "entropy_coeff", 0.0))
        if entropy != 0.0:
            out.append(f"{a}entropy_coeff={entropy}: FlowRL's loss has no entropy bonus (verl would compute the "
                       "entropy and FlowRL would drop it); set it to 0")
        for name, eps_name, eps in (("clip_ratio_low", "eps_low", loss.eps_low),
                                    ("clip_ratio_high", "eps_high", loss.eps_high)):
            value = float(_get(actor, name, defaults[name]))
            if value not in (float(defaults[name]), eps):
                out.append(f"{a}{name}={value}: FlowRL's importance weight is clipped to [1 - eps_low, 1 + eps_high] "
                           f"with {FLOWRL_NODE}.{eps_name} (now {eps}); set that instead and leave {name} at "
                           f"verl's {defaults[name]} (or equal to it)")
        ratio = float(_get(actor, "clip_ratio", defaults["clip_ratio"]))
        if ratio != float(defaults["clip_ratio"]) and not ratio == loss.eps_low == loss.eps_high:
            out.append(f"{a}clip_ratio={ratio}: FlowRL's clip range is {FLOWRL_NODE}.eps_low / eps_high (now "
                       f"{loss.eps_low} / {loss.eps_high}); leave clip_ratio at verl's {defaults['clip_ratio']}")
        dual = float(_get(actor, "clip_ratio_c", defaults["clip_ratio_c"]))
        if dual != float(defaults["clip_ratio_c"]):
            out.append(f"{a}clip_ratio_c={dual}: dual-clip PPO has no counterpart in FlowRL's loss; leave it at "
                       f"verl's {defaults['clip_ratio_c']}")
        mode = _get(actor, "policy_loss.loss_mode", defaults["policy_loss.loss_mode"])
        if replaces_policy_loss and mode != defaults["policy_loss.loss_mode"]:
            out.append(f"{a}policy_loss.loss_mode={mode}: the FlowRL trainer replaces verl's policy loss, so this "
                       "is unused (flowrl_old_ref is for verl's own trainers); leave it at "
                       f"{defaults['policy_loss.loss_mode']!r}")
        strategy = str(_get(actor, "strategy", "fsdp"))
        engine_needed = flowrl.log_z == "head" or flowrl.logprobs in ("logits", "hidden")
        if engine_needed and strategy not in ("fsdp", "fsdp2"):
            out.append(f"{a}strategy={strategy}: the log-Z head and flowloss's log-prob paths live in "
                       "FlowRLFSDPEngine (fsdp/fsdp2); use log_z=vargrad and logprobs=framework with other engines")
        sp = int(_get(actor, "ulysses_sequence_parallel_size", 1) or 1)
        if engine_needed and sp > 1:
            out.append(f"{a}ulysses_sequence_parallel_size={sp}: the log-Z head pools whole prompts and flowloss's "
                       "log-prob paths are not tested under sequence parallelism; set it to 1 (or use "
                       "log_z=vargrad with logprobs=framework)")
        orig_params = bool(_get(actor, "fsdp_config.use_orig_params", False))
        if head.lr is not None and strategy == "fsdp" and not orig_params:
            out.append(f"{FLOWRL_NODE}.log_z_lr={head.lr}: FSDP1 flattens the head's parameters into the model's, "
                       f"so they cannot get their own learning rate; set {a}fsdp_config.use_orig_params=True or "
                       f"{a}strategy=fsdp2")
        if algorithm is not None and not _get(actor, "use_kl_loss", False) and not _get(
                algorithm, "use_kl_in_reward", False):
            out.append(f"{a}use_kl_loss=False: verl keeps the reference policy FlowRL needs only with a KL option "
                       f"on; set {a}use_kl_loss=True with {a}kl_loss_coef=0.0")
    if algorithm is not None:
        rollout_is = _get(algorithm, "rollout_correction.rollout_is", None)
        if rollout_is == "token":
            out.append("algorithm.rollout_correction.rollout_is=token: FlowRL's importance weight is per sequence; "
                       "use rollout_is=sequence (its weight multiplies w_i) or "
                       f"{FLOWRL_NODE}.rollout_tis=true")
        elif rollout_is is not None and flowrl.rollout_tis:
            out.append(f"algorithm.rollout_correction.rollout_is={rollout_is} with {FLOWRL_NODE}.rollout_tis=true: "
                       "both correct for the rollout engine (the weight would be applied twice); keep one")
    if model is not None:
        m = "actor_rollout_ref.model."
        if flowrl.logprobs in ("logits", "hidden") and _get(model, "use_fused_kernels", False):
            out.append(f"{FLOWRL_NODE}.logprobs={flowrl.logprobs} with {m}use_fused_kernels=True: the model would "
                       "return verl's fused log-probs, not logits; choose one (logprobs=framework keeps verl's "
                       "kernels)")
        packed = _get(model, "use_remove_padding", True)
        if not packed and (flowrl.log_z == "head" or flowrl.logprobs in ("logits", "hidden")):
            out.append(f"{m}use_remove_padding=False: the log-Z head and flowloss's log-prob paths read verl's "
                       "packed layout; set it to True")
    return out


def check_verl_settings(flowrl: FlowRLConfig, **parts: Any) -> None:
    """Raise one ``ValueError`` listing every conflict `verl_conflicts` finds (nothing when there is none)."""
    conflicts = verl_conflicts(flowrl, **parts)
    if conflicts:
        lines = "\n".join(f"  - {c}" for c in conflicts)
        raise ValueError(f"FlowRL cannot run with {len(conflicts)} verl setting(s) as given:\n{lines}")
