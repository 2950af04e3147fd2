"""`--hobbit-low auto`: no low copies without a GPU (there is no host->GPU link to save
bytes on, so nothing is lost to precision); on a GPU int2 for files under 5 bits per
weight (MXFP4 included) and int4 above — the rule the planner's HOBBIT prediction uses."""

from __future__ import annotations

import pytest

from moechat.backends.errors import MoechatError
from moechat.backends.offload.low_copies import auto_low_bits, low_bits
from moechat.backends.plan import cost_model


@pytest.mark.parametrize("expert_type", ["F32", "F16", "Q8_0", "Q6_K", "Q4_K", "Q4_0", "MXFP4", "Q2_K"])
def test_auto_is_none_without_a_gpu_and_the_cost_models_rule_with_one(expert_type):
    assert low_bits("auto", expert_type, has_gpu=False) == 0
    bits = low_bits("auto", expert_type, has_gpu=True)
    assert bits == auto_low_bits(expert_type, True)
    assert bits == (2 if cost_model.BITS[expert_type] < 5 else 4)
    # groupwise: `bits` per weight plus an fp16 scale and minimum per 32 weights
    assert cost_model._hobbit_low_bits(expert_type) == bits + 32 / 32


def test_explicit_formats_hold_on_any_device():
    for has_gpu in (False, True):
        assert low_bits("int4", "MXFP4", has_gpu) == 4
        assert low_bits("int2", "Q8_0", has_gpu) == 2
        assert low_bits("none", "F16", has_gpu) == 0
    assert low_bits("auto", "MXFP4", True) == 2  # 3 bits per weight against MXFP4's 4.25


def test_unknown_format_is_one_clear_error():
    with pytest.raises(MoechatError, match="unknown --hobbit-low 'int3'"):
        low_bits("int3", "Q8_0", False)
