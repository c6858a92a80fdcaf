"""``python -m flowloss.adapters.openrlhf``: OpenRLHF's ``train_ppo_ray`` launcher with FlowRL swapped in.

OpenRLHF's own launcher runs unchanged, with the FlowRL workers (`flowloss.adapters.openrlhf.worker`) in place of
its policy and reference workers, the ``--flowrl.*`` options on its parser (``--help`` lists them; a bad value
exits 2 naming the flag), the OpenRLHF flags FlowRL needs checked before Ray starts, and the options on
``strategy.args.flowrl`` for the workers. ``--help`` and the flag checks work without the GPU-only packages
(flash-attn, vllm); a run without them stops before Ray with a message naming them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from flowloss.adapters.openrlhf import _compat
from flowloss.adapters.openrlhf.config import EMA_ERROR, ENTROPY_ERROR, RING_ATTENTION_ERROR, FlowRLConfig

__all__ = ["check_openrlhf_args", "main"]

FLAG_PREFIX = "--flowrl."
_DEST = "flowrl."


def check_openrlhf_args(args: Any, config: FlowRLConfig) -> None:
    """OpenRLHF flags FlowRL needs or cannot honour (``args`` as ``hierarchize``d by OpenRLHF); ValueError."""
    kl, adv = args.algo.kl, args.algo.advantage
    if not (kl.init_coef > 0 and kl.use_loss):
        raise ValueError(
            "FlowRL needs the reference policy's log-probs: pass --algo.kl.init_coef 1e-3 (any value > 0 "
            "creates the reference model) and --algo.kl.use_loss (keeps its log-probs, keeps KL out of the "
            "reward; the KL loss itself is dropped unless --flowrl.kl_loss true)"
        )
    if config.reward_source == "advantages" and adv.estimator != "group_norm":
        raise ValueError(
            "FlowRL's r_hat is the group z-scored reward: pass --algo.advantage.estimator group_norm "
            f"(got {adv.estimator!r}), or --flowrl.reward_source rewards"
        )
    if args.actor.entropy_coef:
        raise ValueError(ENTROPY_ERROR.format(args.actor.entropy_coef))
    if args.ds.ring_attn_size > 1:
        raise ValueError(RING_ATTENTION_ERROR)
    if args.train.enable_ema:
        raise ValueError(EMA_ERROR)
    if config.log_z_head.lr is not None and getattr(args.actor, "optim", "adam") == "muon":
        raise ValueError("--flowrl.log_z_lr cannot be used with --actor.optim muon: DeepSpeed's Muon regroups "
                         "every parameter into its own two groups and overrides their learning rates")


def _missing_gpu_packages(missing: tuple[str, ...]) -> str:
    names = " and ".join(f"{m} (pip install {_compat.GPU_ONLY_PACKAGES[m]})" for m in missing)
    return (f"OpenRLHF's launcher needs {names}, which are not installed here (GPU-only packages; `--help` and "
            "the flag checks work without them)")


def main(argv: list[str] | None = None) -> None:
    """``python -m flowloss.adapters.openrlhf [--flowrl.<option> value ...] <train_ppo_ray args>``."""
    import runpy

    state: dict[str, Any] = {}

    def on_parser(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
        FlowRLConfig.add_arguments(parser, FLAG_PREFIX, dest_prefix=_DEST)
        FlowRLConfig.refuse_unknown_flags(args, FLAG_PREFIX, parser)
        return args

    def on_parsed(parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> None:
        from openrlhf.utils.config import hierarchize

        config = FlowRLConfig.from_parsed(parsed, parser, dest_prefix=_DEST, prefix=FLAG_PREFIX)
        try:
            check_openrlhf_args(hierarchize(parsed), config)
        except ValueError as exc:
            parser.error(str(exc))
        if state["missing"]:
            parser.exit(1, f"{parser.prog}: error: {_missing_gpu_packages(state['missing'])}\n")
        state["config"] = config

    saved_argv = sys.argv
    sys.argv = ["openrlhf.cli.train_ppo_ray", *(saved_argv[1:] if argv is None else argv)]
    try:
        with _compat.gpu_stand_ins() as missing:
            state["missing"] = missing
            try:
                ppo_actor = importlib.import_module("openrlhf.trainer.ray.ppo_actor")
                ray_launcher = importlib.import_module("openrlhf.trainer.ray.launcher")
                orl_utils = importlib.import_module("openrlhf.utils")
                worker = importlib.import_module("flowloss.adapters.openrlhf.worker")
            except ImportError as exc:
                if (exc.name or "").startswith("flowloss"):
                    raise
                raise SystemExit(f"error: {_compat.missing_package_message(exc.name)}") from exc
            original_get_strategy = orl_utils.get_strategy

            def get_strategy(args: Any) -> Any:
                args.flowrl = state["config"]
                return original_get_strategy(args)

            patches = [(ppo_actor, "PolicyModelActor", worker.FlowRLPolicyModelActor),
                       (ray_launcher, "ReferenceModelActor", worker.FlowRLReferenceModelActor),
                       (orl_utils, "get_strategy", get_strategy)]
            saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
            for module, name, value in patches:
                setattr(module, name, value)
            try:
                with _compat.flowrl_flags_on_parser(on_parser, on_parsed):
                    printer = _compat.launcher_print(lambda: state["config"].kl_loss)
                    runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True,
                                     init_globals={"print": printer})
            finally:
                for module, name, value in saved:
                    setattr(module, name, value)
    finally:
        sys.argv = saved_argv
