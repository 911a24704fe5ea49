"""The digits' training shifts (`data.max_shift`) and their refusal elsewhere, through the library."""

import pytest
import torch

from lowrank_cli.data.images import DIGITS_SHIFT, load_image_data
from lowrank_cli.errors import LowrankError
from lowrank_cli.models.family import ImageConfig

CFG = ImageConfig((1, 16, 16), (0.5,), (0.5,), "bilinear", None)


def _draws(train, i: int, n: int = 20) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [train[i][0] for _ in range(n)]


def test_digits_shift_by_default_and_not_at_max_shift_0():
    assert DIGITS_SHIFT == 2
    shifted = load_image_data("digits", CFG).train
    still = load_image_data("digits", CFG, max_shift=0).train
    assert torch.equal(shifted.images, still.images)  # the same split, only the draws differ
    assert any(not torch.equal(x, shifted.images[3]) for x in _draws(shifted, 3))
    assert all(torch.equal(x, still.images[3]) for x in _draws(still, 3))
    val = load_image_data("digits", CFG, max_shift=4).val
    assert torch.equal(val[5][0], val.images[5])  # held-out digits are never shifted


@pytest.mark.parametrize("source", ["synthetic", "/no/such/folder"])
def test_max_shift_is_refused_for_other_sources_naming_the_key(source):
    with pytest.raises(LowrankError, match=rf"data.max_shift 1 shifts the digits' training images; data '{source}' takes none") as e:
        load_image_data(source, CFG, max_shift=1)
    assert e.value.param == "data.max_shift"


def test_a_data_source_given_drops_the_recipes_digits_shift_unless_it_is_digits():
    from lowrank_cli.pipelines.compress import with_run_options
    from lowrank_cli.recipe import load_recipe

    demo = load_recipe("demo")
    assert demo.data.max_shift == 0
    assert with_run_options(demo, data="digits").data.max_shift == 0
    other = with_run_options(demo, data="synthetic")
    assert (other.data.source, other.data.max_shift) == ("synthetic", None)  # --data synthetic on the demo recipe runs
    assert demo.data.max_shift == 0  # the recipe given is unchanged
