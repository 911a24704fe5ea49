"""The memory model (`plan.memory`): its shapes give the published parameter counts, and its stages order as the paths do."""

import pytest

from lowrank_cli.plan.memory import LLAMA_7B, LLAMA_70B, SMOLLM2_135M, WORK_PER_BLOCK, block_need, in_memory_need, stage_peaks


@pytest.mark.parametrize("shape, params", [(SMOLLM2_135M, 134_515_008), (LLAMA_7B, 6_738_415_616), (LLAMA_70B, 70_553_706_496)])
def test_shapes_count_the_published_parameters(shape, params):
    assert shape.params == params  # SmolLM2-135M as its checkpoint holds it (tied head); Llama-2-7B; Llama-3-70B


def test_one_block_at_a_time_holds_a_fraction_of_the_in_memory_run():
    for shape in (LLAMA_7B, LLAMA_70B):
        peaks = stage_peaks(shape, processes=8)
        whole = max(peaks["in memory"].values())
        blocks = peaks["one block at a time"]
        assert blocks["blocks: weights and training"] == block_need(shape.block_params * 2, shape.outside_params * 2)
        assert blocks["blocks: weights and training"] + blocks["blocks: activations"] < 0.1 * whole
        assert peaks["FSDP, 8 processes"]["end-to-end"] < peaks["in memory"]["end-to-end"]
    assert in_memory_need(10) == WORK_PER_BLOCK * 10 and block_need(10, 100) == 100 and block_need(10, 1, times=2) == 20
