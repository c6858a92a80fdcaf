"""A new `beta` default, written in its one line of flowloss/options.py, reaches the TRL adapter's config."""

from __future__ import annotations

import textwrap

from tests.adapters.conftest import require_framework
from tests.test_options import NEW_BETA, beta_seen_with_a_new_default


def test_flowrl_config_takes_the_new_beta_default(tmp_path):
    require_framework("trl")
    probe = textwrap.dedent(
        """
        import json
        from flowloss.adapters.trl import FlowRLConfig
        config = FlowRLConfig(output_dir="out", report_to="none", use_cpu=True)
        print(json.dumps({"flowrl_beta": config.flowrl_beta, "flowrl_options": config.flowrl_options.beta}))
        """
    )
    assert beta_seen_with_a_new_default(tmp_path, probe) == {"flowrl_beta": NEW_BETA, "flowrl_options": NEW_BETA}
