"""The moving average of the weights (launch/ema.py), in one process: its update rule, the
swap used for evaluation and export, and its checkpoint files across expert-parallel layouts.
The training loop's use of it is in test_elastic_resume.py (the reference run keeps one)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from launch.ema import EMA_SHARED_FILE, WeightAverage, ema_expert_file, read_ema


class Experts(nn.Module):
    """Parameter names as DeepSpeed's MoE layer has them (`...deepspeed_experts.<local id>...`)."""

    def __init__(self, local: int, first: int = 0):
        super().__init__()
        self.proj = nn.Linear(3, 2)
        self.moe = nn.Module()
        self.moe.deepspeed_experts = nn.ModuleList(nn.Linear(2, 2) for _ in range(local))
        with torch.no_grad():
            self.proj.weight.fill_(0.5)
            for i, expert in enumerate(self.moe.deepspeed_experts):
                expert.weight.fill_(first + i)  # an expert's weights say its global id


def test_the_average_follows_the_ramped_decay():
    module = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(0.0)
    ema = WeightAverage(module, decay=0.9)
    expected = 0.0
    for step in range(1, 40):
        with torch.no_grad():
            module.weight.fill_(float(step))
        ema.update(module, step)
        d = min(0.9, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * step
        assert ema.average["weight"].item() == pytest.approx(expected, rel=1e-6)
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(1000) == 0.9


def test_swapped_in_puts_the_average_in_and_the_weights_back():
    module = nn.Linear(2, 2)
    ema = WeightAverage(module, decay=0.5)
    trained = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    after = {k: v.clone() for k, v in module.state_dict().items()}
    with ema.swapped_in(module):
        assert all(torch.equal(module.state_dict()[k], trained[k]) for k in trained)
    assert all(torch.equal(module.state_dict()[k], after[k]) for k in after)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_a_decay_outside_0_1_is_refused(decay):
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(nn.Linear(1, 1), decay)


def test_the_checkpoint_files_reshard_the_experts_onto_another_ep_size(tmp_path):
    """Written by 2 expert-parallel ranks of 2 experts each, read back by 1 rank of 4 and by
    4 ranks of 1: each gets the experts of its global ids."""
    for rank in range(2):
        WeightAverage(Experts(local=2, first=2 * rank), 0.9).save(tmp_path, rank, ep_size=2, num_experts=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([EMA_SHARED_FILE, ema_expert_file(0),
                                                                  ema_expert_file(1)])
    whole = read_ema(tmp_path)
    assert [whole[f"moe.deepspeed_experts.{g}.weight"][0, 0].item() for g in range(4)] == [0, 1, 2, 3]

    one = WeightAverage(Experts(local=4, first=100), 0.9)
    assert one.load(tmp_path, ep_rank=0, ep_size=1, num_experts=4)
    assert [one.average[f"moe.deepspeed_experts.{i}.weight"][0, 0].item() for i in range(4)] == [0, 1, 2, 3]
    for rank in range(4):
        part = WeightAverage(Experts(local=1, first=100), 0.9)
        assert part.load(tmp_path, ep_rank=rank, ep_size=4, num_experts=4)
        assert part.average["moe.deepspeed_experts.0.weight"][0, 0].item() == rank
        assert part.average["proj.weight"][0, 0].item() == 0.5


def test_ranks_beyond_the_first_expert_parallel_group_write_nothing(tmp_path):
    WeightAverage(Experts(local=2), 0.9).save(tmp_path, rank=3, ep_size=2, num_experts=4)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_without_an_average_says_so_and_one_missing_experts_is_refused(tmp_path):
    ema = WeightAverage(Experts(local=2), 0.9)
    assert not ema.load(tmp_path, ep_rank=0, ep_size=1, num_experts=2)
    WeightAverage(Experts(local=1), 0.9).save(tmp_path, 0, ep_size=2, num_experts=2)  # rank 1's file never written
    with pytest.raises(ValueError, match="lacks"):
        ema.load(tmp_path, ep_rank=0, ep_size=1, num_experts=2)


def test_a_truncated_average_file_is_an_error_naming_it(tmp_path):
    WeightAverage(Experts(local=2), 0.9).save(tmp_path, 0, ep_size=1, num_experts=2)
    damaged = tmp_path / ema_expert_file(0)
    damaged.write_bytes(damaged.read_bytes()[:40])
    with pytest.raises(ValueError, match=rf"{damaged.name}: unreadable weight-average file"):
        WeightAverage(Experts(local=2), 0.9).load(tmp_path, ep_rank=0, ep_size=1, num_experts=2)
