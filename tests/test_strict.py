"""`FLOWLOSS_STRICT`: a documented set of on/off spellings; anything else warns (naming the variable) and is off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flowloss.strict import OFF_VALUES, ON_VALUES, strict_from_environment


@pytest.mark.parametrize("value", [*ON_VALUES, "TRUE", " On ", "Yes"])
def test_on_spellings(value, recwarn):
    assert strict_from_environment(value) is True
    assert not recwarn.list


@pytest.mark.parametrize("value", [None, *OFF_VALUES, "FALSE", " off "])
def test_off_spellings(value, recwarn):
    assert strict_from_environment(value) is False
    assert not recwarn.list


@pytest.mark.parametrize("value", ["none", "disable", "0.0", "flase", "2", "enabled"])
def test_anything_else_warns_and_stays_off(value):
    message = rf"FLOWLOSS_STRICT='{value}' is not a known setting; strict mode stays off"
    with pytest.warns(RuntimeWarning, match=message):
        assert strict_from_environment(value) is False


@pytest.mark.parametrize(("value", "expected"), [("1", "True"), ("0", "False"), ("off", "False"), ("", "False")])
def test_the_variable_is_read_at_import(value, expected):
    env = {**os.environ, "FLOWLOSS_STRICT": value}
    out = subprocess.run([sys.executable, "-c", "import flowloss; print(flowloss.is_strict())"], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
    typo = subprocess.run([sys.executable, "-c", "import flowloss; print(flowloss.is_strict())"],
                          env={**env, "FLOWLOSS_STRICT": "flase"}, capture_output=True, text=True, check=True)
    assert typo.stdout.strip() == "False" and "FLOWLOSS_STRICT='flase'" in typo.stderr
