"""What generate refuses or warns about before it runs (docs/design.md §3.5 style: the argument,
what was expected, what was given): an empty batch, attention_mask values other than 0/1, and a
generation that passes max_position_embeddings (a warning: the result is defined, the model
never saw those positions)."""
from __future__ import annotations

import warnings

import pytest
import torch
from model_testing import needs_cpu_kernels, tiny_model

from pldr_kernels.reference_model import ReferencePLDR

pytestmark = needs_cpu_kernels


@pytest.fixture(scope="module")
def model():
    return tiny_model(max_position_embeddings=16)


def test_empty_batch_is_refused(model):
    with pytest.raises(ValueError, match=r"input_ids must be \[B, S\] with B >= 1 rows and S >= 1 "
                                         r"tokens, got shape \(0, 4\)"):
        model.generate(torch.zeros(0, 4, dtype=torch.long), 2)


@pytest.mark.parametrize("value", [0.5, -0.5], ids=str)
def test_attention_mask_values_other_than_0_and_1_are_refused(model, value):
    """Such values used to be cast to 0 and taken as a pad."""
    ids = torch.full((1, 4), 5)
    mask = torch.tensor([[value, 1.0, 1.0, 1.0]])
    for generate in (model.generate, ReferencePLDR.from_model(model).generate):
        with pytest.raises(ValueError, match="attention_mask must contain only 0 .pad. and 1"):
            generate(ids, 2, attention_mask=mask)


def test_generation_past_max_position_embeddings_warns(model):
    ids = torch.full((2, 6), 5)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 6 real tokens + 10 new = 16 positions: no warning
        model.generate(ids, 10, attention_mask=mask, eos_token_id=None)
    with pytest.warns(UserWarning, match=r"reaches 17 positions .*6 tokens \+ max_new_tokens=11"
                                         r".*max_position_embeddings=16"):
        out = model.generate(ids, 11, attention_mask=mask, eos_token_id=None)
    assert out.shape == (2, 17)  # a warning, not a refusal: the tokens are still generated
