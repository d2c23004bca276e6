"""Transform coding of K/V: a calibrated decorrelating basis + per-component bit allocation.

The classic transform coder (KLT + reverse water-filling), fitted per model, layer and head:

    encode:  z = (x - mean) @ basis                   [T, H, D]  decorrelated components
             code_i = nearest level of z_i's own Lloyd-Max quantizer at bits[h, i] bits
    decode:  x = levels[code] @ basis^-1 + mean

``basis [H, D, D]`` diagonalises the covariance in the *attention-weighted* space (see
:func:`fit_transform`), each component ``i`` has its own quantizer fitted to calibration
data (``2**bits[h, i]`` levels, all components' levels packed into one flat table, see
:class:`Transform`), and the widths
``bits [H, D]`` (0-8, the same total per head) come from greedy reverse water-filling on
the measured distortions. All of it is a per-model constant: a token-head costs exactly
``sum(bits[h])`` bits, with no per-token scale, norm or zero point. Components with little
weighted variance get 0 bits (the mean predicts them); the strongest get up to 8.

Why it beats a random rotation at equal bits: a rotation spreads all channels' variance
evenly and spends the same bits on every coordinate; the weighted variances of K/V
components on our model span orders of magnitude, and reverse water-filling turns the
distortion of their arithmetic mean into that of their geometric mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_seqkv.codec.base import CodecInputError, Packed, TensorCodec
from vllm_seqkv.codec.component_quantizers import (
    ITERATIONS,
    MAX_BITS,
    SortedRows,
    fit_and_allocate,
    greedy_bits,
    lloyd_max_sorted,
)

COUNTED_BITS = 3  # widths quantized by counting thresholds (branch-free; faster than a search)


def lloyd_max(samples: torch.Tensor, bits: int, iterations: int = ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D Lloyd-Max quantizers fitted to data, one per row: ``samples [C, N]`` ->
    ``levels [C, 2**bits]`` (ascending) and their mean squared error ``[C]``."""
    return lloyd_max_sorted(SortedRows.of(samples), bits, iterations)


def allocate_bits(distortion: torch.Tensor, total_bits: int) -> torch.Tensor:
    """Greedy integer reverse water-filling: ``distortion [D, MAX_BITS+1]`` (expected squared
    error of each component at 0..MAX_BITS bits) -> ``bits [D]`` summing to ``total_bits``,
    each extra bit going where it removes the most error."""
    dim = distortion.shape[0]
    _check_budget(total_bits, dim)
    gains = torch.cat([distortion[:, :-1] - distortion[:, 1:], torch.zeros(dim, 1, dtype=distortion.dtype)], -1)
    return greedy_bits(gains[None], total_bits)[0]


def _check_budget(total_bits: int, dim: int) -> None:
    if total_bits > MAX_BITS * dim:
        raise CodecInputError(f"{total_bits} bits exceed {MAX_BITS} per component")


def level_starts(bits: torch.Tensor) -> torch.Tensor:
    """int32 ``[H, D]``: where component ``(h, c)``'s ``2**bits[h, c]`` entries begin in a packed
    level (or threshold) table: row-major over ``(h, c)``, no padding."""
    sizes = (1 << bits.long()).reshape(-1)
    return (sizes.cumsum(0) - sizes).view(bits.shape).to(torch.int32)


def pack_levels(bits: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
    """``padded [H, D, 2**MAX_BITS]`` (first ``2**bits`` entries used) -> the packed float32
    table ``[sum(2**bits)]`` (component ``(h, c)``'s levels at ``level_starts(bits)[h, c]``)."""
    used = torch.arange(padded.shape[-1]) < (1 << bits.long())[..., None]
    return padded.float()[used].contiguous()  # row-major boolean indexing keeps (h, c, i) order


def unpack_levels(bits: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_levels`: ``[H, D, 2**MAX_BITS]``, zeros past each ``2**bits``."""
    used = torch.arange(1 << MAX_BITS) < (1 << bits.long())[..., None]
    padded = torch.zeros(used.shape, dtype=packed.dtype)
    padded[used] = packed
    return padded


@dataclass(frozen=True)
class Transform:
    """Per-head constants: ``mean [H, D]``, ``basis [H, D, D]``, ``bits [H, D]`` and the
    component quantizers, packed: ``levels [sum(2**bits)]`` float32, component ``(h, c)``'s
    ``2**bits[h, c]`` ascending levels from ``level_starts(bits)[h, c]`` on. Packed because a
    ``[H, D, 256]`` table is ~92 % padding at 2-4 bits per component (the engine holds it for
    its whole life); files store the padded form (:meth:`padded_levels`, :meth:`from_padded`)."""

    mean: torch.Tensor
    basis: torch.Tensor
    bits: torch.Tensor
    levels: torch.Tensor

    def __post_init__(self):
        heads, dim = self.mean.shape
        if self.basis.shape != (heads, dim, dim) or self.bits.shape != (heads, dim) or self.levels.dim() != 1:
            raise CodecInputError("transform tensors must be mean/bits [H, D], basis [H, D, D], "
                                  "levels [sum(2**bits)] (packed)")
        if bool(((self.bits < 0) | (self.bits > MAX_BITS)).any()):
            raise CodecInputError(f"transform widths must be 0..{MAX_BITS} bits")
        if self.levels.numel() != int((1 << self.bits.long()).sum()):
            raise CodecInputError(f"packed levels hold {self.levels.numel()} entries, the widths need "
                                  f"{int((1 << self.bits.long()).sum())}")
        totals = self.bits.sum(-1)
        if not bool((totals == totals[0]).all()) or int(totals[0]) % 8:
            raise CodecInputError("every head needs the same whole number of bytes of bits")

    @classmethod
    def from_padded(cls, mean: torch.Tensor, basis: torch.Tensor, bits: torch.Tensor,
                    levels: torch.Tensor) -> "Transform":
        """From ``levels [H, D, 2**MAX_BITS]`` (the fit's and the calibration file's form)."""
        heads, dim = mean.shape
        if levels.shape != (heads, dim, 1 << MAX_BITS) or bits.shape != (heads, dim):
            raise CodecInputError(f"padded levels must be [H, D, {1 << MAX_BITS}] with bits [H, D]")
        return cls(mean, basis, bits, pack_levels(bits, levels))

    def padded_levels(self) -> torch.Tensor:
        """``[H, D, 2**MAX_BITS]`` (a new tensor; zeros past each component's ``2**bits``)."""
        return unpack_levels(self.bits, self.levels)

    @property
    def level_start(self) -> torch.Tensor:
        return level_starts(self.bits)

    @property
    def bits_per_vector(self) -> int:
        return int(self.bits[0].sum())


def rope_pair_covariance(cov: torch.Tensor) -> torch.Tensor:
    """Keep only the entries of ``cov [D, D]`` within RoPE pairs ``{j, j + D/2}`` (zero the rest)."""
    dim = cov.shape[-1]
    idx = torch.arange(dim)
    same_pair = (idx[:, None] % (dim // 2)) == (idx[None, :] % (dim // 2))
    return cov * same_pair


def fit_transform(samples: torch.Tensor, metric: torch.Tensor, bits_per_element: float,
                  rope_pairs: bool = False) -> Transform:
    """Fit one stream's transform from calibration activations.

    ``samples [N, H, D]``; ``metric [H, D, D]``: the positive semi-definite form that turns a
    reconstruction error ``e`` into the error attention cares about, ``e^T M e`` (keys: the
    queries' second moments; values: ``W_o^T W_o`` of the head). The basis diagonalises the
    covariance in the metric-whitened space ``M^{1/2}(x - mean)``, so squared error in the
    components is the metric-weighted error; each component gets its own Lloyd-Max quantizer,
    and the widths come from the measured distortions (:func:`.component_quantizers.fit_and_allocate`:
    only the widths the allocation may choose are fitted).

    ``rope_pairs`` (keys in the pre-RoPE frame, with a metric diagonal and equal within each
    RoPE pair): the basis only mixes the two channels of a RoPE pair ``{j, j + D/2}``, so it
    commutes with RoPE's per-pair rotation: a decode kernel scores a position in ``O(D)``
    (rotate the pair's 2-vector) instead of rebuilding the key with a ``D x D`` product.
    """
    samples = samples.double()
    heads, dim = samples.shape[1:]
    mean = samples.mean(0)
    total = round(bits_per_element * dim / 8) * 8
    _check_budget(total, dim)
    bases, components = [], []
    for h in range(heads):
        evals, evecs = torch.linalg.eigh(metric[h].double())
        root = evecs @ torch.diag(evals.clamp_min(evals.max() * 1e-9).sqrt()) @ evecs.T
        centred = (samples[:, h] - mean[h]) @ root
        cov = centred.T @ centred / centred.shape[0]
        if rope_pairs:
            cov = rope_pair_covariance(cov)
            if not torch.equal(rope_pair_covariance(root), root):
                raise CodecInputError("rope_pairs needs a metric that does not mix RoPE pairs")
            # eigh of a block-diagonal matrix can mix degenerate blocks: keep pairs apart
            basis = _pair_basis(root, cov)
        else:
            basis = root @ torch.linalg.eigh(cov)[1].flip(1)
        bases.append(basis)
        components.append(((samples[:, h] - mean[h]) @ basis).T)  # [D, N]
    # every head's components at once: quantizers fitted lazily, widths per head
    fit = fit_and_allocate(torch.cat(components), heads, total)
    return Transform.from_padded(mean.float(), torch.stack(bases).float(), fit.bits.view(heads, dim),
                                 fit.levels.view(heads, dim, -1))


def _pair_basis(root: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``root @ U`` where ``U`` diagonalises each RoPE pair's 2x2 block of ``cov`` (component
    ``j`` and ``j + D/2`` are pair ``j``'s eigenvectors, larger variance first)."""
    dim = cov.shape[-1]
    half = dim // 2
    pair = torch.arange(half)
    idx = torch.stack([pair, pair + half], -1)  # [half, 2]: channels of each pair
    blocks = cov[idx[:, :, None], idx[:, None, :]]  # [half, 2, 2]
    vecs = torch.linalg.eigh(blocks)[1].flip(-1)
    u = torch.zeros_like(cov)
    u[idx[:, :, None], idx[:, None, :]] = vecs
    return root @ u


def is_rope_pair_matrix(matrix: torch.Tensor) -> bool:
    """True when every ``[D, D]`` matrix in ``matrix [..., D, D]`` only mixes RoPE pairs."""
    return bool(torch.equal(rope_pair_covariance(matrix), matrix))


class TransformCodec(TensorCodec):
    """Per-token code of ``sum(bits[h])`` bits per token-head (see module docstring)."""

    def __init__(self, transform: Transform):
        self.transform = transform
        self.block_size = 1
        t = transform
        order = torch.argsort(t.bits, dim=-1, descending=True, stable=True)  # [H, D]
        # bit-plane order: (component, bit) pairs, the same count per head
        comp, plane = [], []
        for h in range(t.bits.shape[0]):
            pairs = [(int(c), j) for c in order[h] for j in range(int(t.bits[h, c]))]
            comp.append([c for c, _ in pairs])
            plane.append([j for _, j in pairs])
        # the slot format: bit p of a head's code bytes is plane plane_index[h, p] (LSB = 0)
        # of component plane_component[h, p]; a component's planes are consecutive, so its
        # code is the field_bits[h, c]-bit field at bit field_offset[h, c]
        self.plane_component = torch.tensor(comp, dtype=torch.long)  # [H, B]
        self.plane_index = torch.tensor(plane, dtype=torch.long)
        ordered_bits = t.bits.gather(-1, order)
        offset = torch.zeros_like(t.bits).scatter_(-1, order, ordered_bits.cumsum(-1) - ordered_bits)
        offset = torch.where(t.bits > 0, offset, 0)  # a 0-bit field reads nothing from byte 0
        self.field_offset = offset.to(torch.int32)  # [H, D]
        self.field_bits = t.bits.to(torch.int32)
        self._field_byte = offset // 8  # [H, D]
        self._field_shift = (offset % 8).to(torch.int32)
        self._field_mask = ((1 << t.bits) - 1).to(torch.int32)
        # where each component's levels (and thresholds) begin in the packed tables [H, D]
        self.level_start = level_starts(t.bits)
        # decision thresholds, packed like the levels: component c's (levels[i] + levels[i+1]) / 2
        # at level_start + i (i < 2**bits - 1), +inf in its last entry; the layout the write
        # kernels read (their params view this tensor: one copy); (bits, components [C] as
        # indices into H * D) per width
        # NOTE: float32 whatever the default dtype (vLLM builds the model, and so the codec,
        # under the model's dtype)
        levels = t.levels.float()
        following = torch.cat([levels[1:], levels.new_full((1,), float("inf"))])
        self.cuts = torch.where(self._is_last_entry(), float("inf"), (levels + following) / 2).contiguous()
        self._widths = []
        flat_bits = t.bits.reshape(-1)
        for b in range(1, MAX_BITS + 1):
            components = (flat_bits == b).nonzero().flatten()
            if components.numel():
                self._widths.append((b, components))
        # [H, component, D], row-major: the layout the kernels read (their params view it)
        self._inverse = torch.linalg.inv(t.basis.double()).float().contiguous()

    def _is_last_entry(self) -> torch.Tensor:
        """bool ``[sum(2**bits)]``: True at each component's last packed entry."""
        ends = (self.level_start.long() + (1 << self.transform.bits.long()) - 1).reshape(-1)
        last = torch.zeros(self.transform.levels.numel(), dtype=torch.bool)
        last[ends] = True
        return last

    def encode(self, x: torch.Tensor) -> Packed:
        self.check_input(x)
        t = self.transform
        if tuple(x.shape[1:]) != tuple(t.mean.shape):
            raise CodecInputError(
                f"TransformCodec: stream is [T, {x.shape[1]}, {x.shape[2]}] but the transform was "
                f"fitted for [T, {t.mean.shape[0]}, {t.mean.shape[1]}] (wrong model or calibration?)")
        z = torch.einsum("thd,hde->the", x.float() - t.mean, t.basis)
        return Packed({"codes": self._pack_fields(self._quantize(z))}, tuple(x.shape))

    def _quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Components ``[T, H, D]`` -> int32 codes: the number of the component's decision
        thresholds below the value (counted directly up to 3 bits, binary search above)."""
        tokens = z.shape[0]
        flat = z.reshape(tokens, -1)
        codes = torch.zeros(flat.shape, dtype=torch.long)
        starts = self.level_start.reshape(-1).long()
        for bits, components in self._widths:
            entries = starts[components, None] + torch.arange((1 << bits) - 1)
            cuts = self.cuts[entries]  # [C, 2**bits - 1] (a copy)
            values = flat.index_select(1, components)  # [T, C]
            code = ((values[..., None] > cuts).sum(-1) if bits <= COUNTED_BITS
                    else torch.searchsorted(cuts, values.T.contiguous()).T)
            codes.index_copy_(1, components, code)
        return codes.view(z.shape).to(torch.int32)

    def decode(self, packed: Packed) -> torch.Tensor:
        t = self.transform
        tokens, heads, dim = packed.shape
        codes = self._unpack_fields(packed.fields["codes"].reshape(tokens, heads, -1))
        z = t.levels[(codes + self.level_start).long()]  # [T, H, D] component values
        return torch.baddbmm(t.mean[:, None, :], z.transpose(0, 1), self._column_major_inverse()).transpose(0, 1)

    def _column_major_inverse(self) -> torch.Tensor:
        """``_inverse`` in column-major storage (a transient copy): the operand layout decode has
        always multiplied by. NOTE: BLAS sums in another order for another layout (one-token
        decodes differ in the last bits), so decode keeps this one and its results stay bit-equal."""
        return self._inverse.transpose(1, 2).contiguous().transpose(1, 2)

    def _pack_fields(self, codes: torch.Tensor) -> torch.Tensor:
        """int32 ``[T, H, D]`` codes -> ``uint8 [T, H, B/8]``: each code's bit field, its low
        byte at ``_field_byte`` and its high byte at the next one (fields never overlap, so a
        sum is an OR)."""
        tokens, heads, _ = codes.shape
        shifted = codes << self._field_shift
        stream = torch.zeros(tokens, heads, self.transform.bits_per_vector // 8 + 1, dtype=torch.int32)
        where = self._field_byte.expand(tokens, -1, -1)
        stream.scatter_add_(-1, where, shifted & 0xFF).scatter_add_(-1, where + 1, shifted >> 8)
        return stream[..., :-1].to(torch.uint8)

    def _unpack_fields(self, raw: torch.Tensor) -> torch.Tensor:
        """``uint8 [T, H, B/8]`` -> int32 codes ``[T, H, D]`` (inverse of :meth:`_pack_fields`)."""
        stream = torch.nn.functional.pad(raw, (0, 1)).to(torch.int32)
        windows = stream[..., :-1] | (stream[..., 1:] << 8)  # [T, H, B/8]: byte i and i + 1
        fields = windows.gather(-1, self._field_byte.expand(raw.shape[0], -1, -1))
        return (fields >> self._field_shift) & self._field_mask

    def bits_per_element(self, num_kv_heads: int, head_dim: int) -> float:
        return self.transform.bits_per_vector / head_dim

