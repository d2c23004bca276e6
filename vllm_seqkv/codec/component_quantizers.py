"""Per-component scalar quantizers of the transform codec and their bit allocation.

The fit of :func:`vllm_seqkv.codec.transform.fit_transform` needs, for every decorrelated
component (a row of ``z [C, N]``), a Lloyd-Max quantizer and its distortion at the widths
the allocation may give it. Three things keep that cheap without changing the result:

- :class:`SortedRows`: each row is sorted (and prefix-summed) once, shared by every width;
  a Lloyd-Max iteration is then a ``searchsorted`` of the decision thresholds plus prefix-sum
  differences, for all rows at once;
- :func:`lloyd_max_sorted` stops when an iteration leaves every row's levels bit-identical
  (a fixed point: further iterations would repeat it);
- :func:`fit_and_allocate` fits widths lazily: greedy reverse water-filling only reads the
  distortion of width ``b + 1`` of a component it has brought to ``b`` bits, so it runs with
  an upper bound (the gain of a bit never exceeds the distortion it starts from) in place of
  a width not fitted yet (and a 6 dB-per-bit guess past it), and fits the next width of the
  components where the bound was chosen, until it is chosen nowhere. When no bound
  is chosen the allocation equals the one computed with every width fitted (the bound is
  never below the true gain, ties go to the lower index as in ``argmax``), so the wide
  quantizers (128 and 256 levels, most of the search work) are fitted only for the strong
  components that may get them.

Every operation is row-wise, so a row's levels do not depend on which rows share a batch,
nor on the number of threads. The fit runs them on one thread (:func:`one_thread`): each
Lloyd-Max iteration is a handful of small ops, and with several threads every op is a parallel
region whose barrier waits for a thread that another process may have descheduled (on a shared
host, the common case for a calibration that runs beside other work, that costs several times
the work itself; ``python -m benchmarks.calibration_fit`` measures it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

MAX_BITS = 8
ITERATIONS = 60


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU ops on one thread inside the block (the previous count restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class SortedRows:
    """``x [C, N]`` float64, each row ascending; ``cum`` / ``cum_sq [C, N + 1]``: prefix sums
    of ``x`` and ``x**2`` (first column 0), so any cell's count, sum and energy are two reads."""

    x: torch.Tensor
    cum: torch.Tensor
    cum_sq: torch.Tensor

    @classmethod
    def of(cls, samples: torch.Tensor) -> "SortedRows":
        # numpy's vectorised sort: the same values as torch's, in less than half the time
        x = torch.from_numpy(np.sort(samples.double().numpy(), axis=-1))
        zero = torch.zeros(x.shape[0], 1, dtype=torch.float64)
        return cls(x, torch.cat([zero, x.cumsum(-1)], -1), torch.cat([zero, (x * x).cumsum(-1)], -1))

    def select(self, rows: torch.Tensor) -> "SortedRows":
        """The rows ``rows`` (ascending indices) only; no copy when that is every row."""
        if rows.numel() == self.x.shape[0]:
            return self
        return SortedRows(self.x[rows], self.cum[rows], self.cum_sq[rows])


def lloyd_max_sorted(rows: SortedRows, bits: int, iterations: int = ITERATIONS
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D Lloyd-Max quantizers, one per row of ``rows``: ``levels [C, 2**bits]`` float32
    (ascending) and their mean squared error ``[C]`` float64. Starts at the quantiles
    ``(k + 1/2) / 2**bits``; an empty cell keeps its previous level."""
    x, cum, cum_sq = rows.x, rows.cum, rows.cum_sq
    count_rows, n = x.shape
    levels = 1 << bits
    first = torch.zeros(count_rows, 1, dtype=torch.long)
    last = torch.full((count_rows, 1), n)
    quantile = ((torch.arange(levels, dtype=torch.float64) + 0.5) / levels * n).long().clamp(max=n - 1)
    centers = x[:, quantile]

    def cells(centers):
        cuts = torch.searchsorted(x, ((centers[:, 1:] + centers[:, :-1]) / 2).contiguous())
        bounds = torch.cat([first, cuts, last], -1)
        count = (bounds[:, 1:] - bounds[:, :-1]).double()
        return bounds, count, cum.gather(1, bounds[:, 1:]) - cum.gather(1, bounds[:, :-1])

    for _ in range(iterations):
        _, count, total = cells(centers)
        moved = torch.where(count > 0, total / count.clamp_min(1), centers).sort(-1).values
        if torch.equal(moved, centers):  # a fixed point: the remaining iterations repeat it
            break
        centers = moved
    bounds, count, total = cells(centers)
    total_sq = cum_sq.gather(1, bounds[:, 1:]) - cum_sq.gather(1, bounds[:, :-1])
    mse = (total_sq - 2 * centers * total + count * centers**2).sum(-1) / n
    return centers.float(), mse.clamp_min(0)


def greedy_bits(gains: torch.Tensor, total_bits: int) -> torch.Tensor:
    """Greedy integer reverse water-filling of each group: ``gains [G, D, MAX_BITS + 1]``
    (error removed by a component's next bit at each width; the last column 0) ->
    ``bits [G, D]``, each group summing to ``total_bits``, each bit going to the component
    whose next bit removes the most error (the lowest index among equals)."""
    groups, dim, _ = gains.shape
    bits = torch.zeros(groups, dim, dtype=torch.long)
    group = torch.arange(groups)
    for _ in range(total_bits):
        best = gains.gather(2, bits[..., None])[..., 0].argmax(-1)
        bits[group, best] += 1
    return bits


@dataclass
class ComponentFit:
    """Fitted quantizers of ``C`` components: ``bits [C]``, ``levels [C, 2**MAX_BITS]``
    (float32, the first ``2**bits`` used, zero beyond), ``distortion [C, MAX_BITS + 1]``
    (NaN where a width was not fitted)."""

    bits: torch.Tensor
    levels: torch.Tensor
    distortion: torch.Tensor


def fit_and_allocate(z: torch.Tensor, groups: int, total_bits: int,
                     quantizer: Callable[[SortedRows, int], tuple[torch.Tensor, torch.Tensor]] = lloyd_max_sorted
                     ) -> ComponentFit:
    """Quantizers and widths of the components ``z [G * D, N]`` (rows of group ``g``:
    ``g * D`` to ``(g + 1) * D - 1``), ``total_bits`` per group, widths fitted lazily (see
    the module docstring): the same bits and levels as fitting every width first."""
    with one_thread():
        return _fit_and_allocate(z, groups, total_bits, quantizer)


def _fit_and_allocate(z, groups, total_bits, quantizer) -> ComponentFit:
    count_rows = z.shape[0]
    dim = count_rows // groups
    rows = SortedRows.of(z)
    distortion = torch.full((count_rows, MAX_BITS + 1), float("nan"), dtype=torch.float64)
    distortion[:, 0] = z.double().pow(2).mean(-1)
    all_levels = torch.zeros(count_rows, MAX_BITS + 1, 1 << MAX_BITS)
    fitted = torch.zeros(count_rows, dtype=torch.long)  # widest fitted width; 0..fitted all known
    widths = torch.arange(MAX_BITS + 1)
    while True:
        known_next = torch.cat([widths[None, 1:] <= fitted[:, None],
                                torch.ones(count_rows, 1, dtype=torch.bool)], -1)
        exact = torch.cat([distortion[:, :-1] - distortion[:, 1:], torch.zeros(count_rows, 1, dtype=torch.float64)], -1)
        # from the widest fitted width on: the bound there, a 6 dB per bit guess above it
        start = distortion.gather(1, fitted[:, None])
        guess = start * 0.25 ** (widths[None, :] - fitted[:, None]).clamp_min(0)
        gains = torch.where(known_next, exact, guess)
        bits = greedy_bits(gains.view(groups, dim, -1), total_bits).view(-1)
        needed = bits > fitted
        if not bool(needed.any()):
            break
        for width in (fitted[needed] + 1).unique().tolist():
            chosen = (needed & (fitted + 1 == width)).nonzero().flatten()
            levels, mse = quantizer(rows.select(chosen), width)
            all_levels[chosen, width, : 1 << width] = levels
            distortion[chosen, width] = mse
            fitted[chosen] = width
    return ComponentFit(bits, all_levels[torch.arange(count_rows), bits], distortion)


def fit_every_width(z: torch.Tensor, groups: int, total_bits: int) -> ComponentFit:
    """REFERENCE (tests, ``benchmarks.calibration_fit``): every width of every component
    fitted on the current thread count, then allocated: what :func:`fit_and_allocate` must equal."""
    count_rows = z.shape[0]
    rows = SortedRows.of(z)
    distortion = torch.zeros(count_rows, MAX_BITS + 1, dtype=torch.float64)
    distortion[:, 0] = z.double().pow(2).mean(-1)
    all_levels = torch.zeros(count_rows, MAX_BITS + 1, 1 << MAX_BITS)
    for width in range(1, MAX_BITS + 1):
        levels, distortion[:, width] = lloyd_max_sorted(rows, width)
        all_levels[:, width, : 1 << width] = levels
    gains = torch.cat([distortion[:, :-1] - distortion[:, 1:], torch.zeros(count_rows, 1, dtype=torch.float64)], -1)
    bits = greedy_bits(gains.view(groups, count_rows // groups, -1), total_bits).view(-1)
    return ComponentFit(bits, all_levels[torch.arange(count_rows), bits], distortion)
