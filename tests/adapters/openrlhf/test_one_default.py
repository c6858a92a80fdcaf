"""A new `beta` default, written in its one line of flowloss/options.py, reaches the OpenRLHF adapter's config and
its `--flowrl.beta` flag."""

from __future__ import annotations

import textwrap

from tests.adapters.conftest import require_framework
from tests.test_options import NEW_BETA, beta_seen_with_a_new_default


def test_flowrl_config_and_its_flag_take_the_new_beta_default(tmp_path):
    require_framework("openrlhf")
    probe = textwrap.dedent(
        """
        import argparse, json
        from flowloss.adapters.openrlhf import FlowRLConfig
        parser = argparse.ArgumentParser()
        FlowRLConfig.add_arguments(parser)
        flag = FlowRLConfig.from_parsed(parser.parse_args([]), parser, dest_prefix="")
        print(json.dumps({"FlowRLConfig": FlowRLConfig().loss.beta, "--flowrl.beta": flag.loss.beta}))
        """
    )
    assert beta_seen_with_a_new_default(tmp_path, probe) == {"FlowRLConfig": NEW_BETA, "--flowrl.beta": NEW_BETA}
