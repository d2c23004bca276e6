import pytest
import torch

from vllm_seqkv.codec.component_quantizers import (
    MAX_BITS,
    SortedRows,
    fit_and_allocate,
    fit_every_width,
    lloyd_max_sorted,
    one_thread,
)
from vllm_seqkv.codec.transform import allocate_bits, lloyd_max


def components(groups=3, dim=32, tokens=2048, seed=0):
    """Rows with variances spanning five decades, some heavy-tailed, one constant per group."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(2, -3, dim, dtype=torch.float64).repeat(groups)
    z = torch.randn(groups * dim, tokens, generator=gen, dtype=torch.float64) * scale[:, None]
    z[::5] = z[::5] ** 3
    z[dim - 1 :: dim] = 0.25
    return z[torch.randperm(groups * dim, generator=gen)]


@pytest.mark.parametrize("groups, bits_per_element", [(1, 2.0), (3, 3.5), (2, 4.5), (2, 7.75)])
def test_lazy_widths_give_the_allocation_and_levels_of_fitting_every_width(groups, bits_per_element):
    z = components(groups)
    total = round(bits_per_element * 32 / 8) * 8
    thresholds = []  # the search work: decision thresholds per row and width

    def counting(rows, width):
        thresholds.append(rows.x.shape[0] * ((1 << width) - 1))
        return lloyd_max_sorted(rows, width)

    lazy = fit_and_allocate(z, groups, total, quantizer=counting)
    every = fit_every_width(z, groups, total)
    assert torch.equal(lazy.bits, every.bits)
    assert torch.equal(lazy.levels, every.levels)
    assert (lazy.bits.view(groups, -1).sum(-1) == total).all()
    known = ~lazy.distortion.isnan()
    assert torch.equal(lazy.distortion[known], every.distortion[known])
    if bits_per_element < 5:  # the wide widths mostly skipped
        assert sum(thresholds) < z.shape[0] * sum((1 << w) - 1 for w in range(1, MAX_BITS + 1)) / 2


def test_allocation_of_groups_equals_each_group_alone():
    z = components(groups=3)
    every = fit_every_width(z, 3, 96)
    for g in range(3):
        alone = allocate_bits(every.distortion[g * 32 : (g + 1) * 32], 96)
        assert torch.equal(alone, every.bits[g * 32 : (g + 1) * 32])


def test_rows_fitted_together_or_alone_are_identical():
    z = components(groups=1)
    together, mse = lloyd_max(z, 5)
    for row in (0, 7, 31):
        alone, alone_mse = lloyd_max_sorted(SortedRows.of(z[row : row + 1]), 5)
        assert torch.equal(alone[0], together[row]) and torch.equal(alone_mse[0], mse[row])


def lloyd_max_every_iteration(samples, bits, iterations=60):
    """The quantizer as first written: sorted per call, every iteration run."""
    x, _ = samples.double().sort(dim=-1)
    rows, n = x.shape
    levels = 1 << bits
    zero = torch.zeros(rows, 1, dtype=torch.float64)
    cum = torch.cat([zero, x.cumsum(-1)], -1)
    cum_sq = torch.cat([zero, (x * x).cumsum(-1)], -1)
    quantile = ((torch.arange(levels, dtype=torch.float64) + 0.5) / levels * n).long().clamp(max=n - 1)
    centers = x[:, quantile]
    for step in range(iterations + 1):
        cuts = torch.searchsorted(x, ((centers[:, 1:] + centers[:, :-1]) / 2).contiguous())
        bounds = torch.cat([zero.long(), cuts, torch.full((rows, 1), n)], -1)
        count = (bounds[:, 1:] - bounds[:, :-1]).double()
        total = cum.gather(1, bounds[:, 1:]) - cum.gather(1, bounds[:, :-1])
        if step < iterations:
            centers = torch.where(count > 0, total / count.clamp_min(1), centers).sort(-1).values
    total_sq = cum_sq.gather(1, bounds[:, 1:]) - cum_sq.gather(1, bounds[:, :-1])
    mse = (total_sq - 2 * centers * total + count * centers**2).sum(-1) / n
    return centers.float(), mse.clamp_min(0)


@pytest.mark.parametrize("bits", range(1, MAX_BITS + 1))
def test_lloyd_max_stopping_at_a_fixed_point_changes_nothing(bits):
    z = components(groups=1, tokens=1024)[:8]
    z[0] = torch.arange(1024, dtype=torch.float64) % 3  # converges at once
    levels, mse = lloyd_max(z, bits)
    reference_levels, reference_mse = lloyd_max_every_iteration(z, bits)
    assert torch.equal(levels, reference_levels) and torch.equal(mse, reference_mse)


def test_one_thread_restores_the_thread_count():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), one_thread():
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("preset", ["seqkv-f4", "seqkv-3"])
def test_streams_fitted_in_parallel_equal_a_serial_fit(preset):
    from tests.codec.synthetic import synthetic_capture
    from vllm_seqkv.codec.presets import PRESETS

    capture = synthetic_capture(layers=3, heads=2, dim=32, tokens=768, vocab=50)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one worker
        serial = PRESETS[preset].fit(capture)
        torch.set_num_threads(3)  # three workers
        parallel = PRESETS[preset].fit(capture)
    finally:
        torch.set_num_threads(before)
    assert serial.tensors.keys() == parallel.tensors.keys()
    for name in serial.tensors:
        assert torch.equal(serial.tensors[name], parallel.tensors[name]), name
