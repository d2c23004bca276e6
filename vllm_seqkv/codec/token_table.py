"""Layer 0 from the token id: exact layer-0 K/V for the price of an index.

In Llama-style models the pre-RoPE keys and the values of layer 0 are a function of the
token id alone (embedding -> input norm -> k/v projections); no position or context enters
before RoPE. So the decoder can rebuild them exactly from a table ``[vocab, H, D]`` built
once from the checkpoint, and the cache stores only which row. The calibration builds the
table with the model's own forward and verifies the property on real text (it does not hold
with absolute position embeddings or anything that mixes tokens before layer 0's attention).

The coder does not need the token ids from the serving engine: it finds them by a nearest
row search of the incoming K (or V) against the table, then checks every token-head is
within ``tolerance`` of its row (relative L2), and refuses otherwise (inputs that are not
vocabulary tokens, such as prompt embeddings, cannot use this code).
"""

from __future__ import annotations

import torch

from vllm_seqkv.codec.base import CodecInputError, Packed, TensorCodec

DEFAULT_TOLERANCE = 0.03  # bf16 rounding of vLLM's own K/V is ~0.5 % relative
SEARCH_CHUNK = 256  # scores [1, chunk, vocab] fp32 per search call
SEARCH_HEADS = 1  # heads with a kept float32 search copy: head 0 (the others are checked)


class TokenTableCodec(TensorCodec):
    """One stream (K pre-RoPE, or V) of layer 0 coded as the token's row in ``table``.

    table ``[vocab, H, D]``; a coded token-head is its row index (int32, 32 bits).
    """

    block_size = 1

    def __init__(self, table: torch.Tensor, tolerance: float = DEFAULT_TOLERANCE):
        if table.dim() != 3:
            raise CodecInputError(f"token table must be [vocab, H, D], got {tuple(table.shape)}")
        self.table = table
        self.tolerance = tolerance
        self._search: torch.Tensor | None = None  # fp32 [1, vocab, D] of head 0, built on first encode
        self._sq_norms: torch.Tensor | None = None  # [1, vocab]

    def encode(self, x: torch.Tensor) -> Packed:
        """``x [T, H, D]`` -> ids ``int32 [T, H, 1]`` of the nearest rows (checked)."""
        self.check_input(x)
        if tuple(x.shape[1:]) != tuple(self.table.shape[1:]):
            raise CodecInputError(f"token table is for [*, {self.table.shape[1]}, {self.table.shape[2]}] "
                                  f"K/V, got {tuple(x.shape)}")
        ids = self.match(x.float())
        return Packed({"ids": ids.to(torch.int32).unsqueeze(-1)}, tuple(x.shape))

    def decode(self, packed: Packed) -> torch.Tensor:
        ids = packed.fields["ids"].reshape(packed.shape[0], packed.shape[1]).long()
        heads = torch.arange(packed.shape[1], device=ids.device)
        return self.table.to(ids.device)[ids, heads].float()

    def probe_input(self, num_kv_heads: int, head_dim: int) -> torch.Tensor:
        return self.table[:1].float()

    def bits_per_element(self, num_kv_heads: int, head_dim: int) -> float:
        return 32.0 / head_dim

    def read_bits_per_element(self, num_kv_heads: int, head_dim: int) -> float:
        """The row index plus the table row it points to (``table.dtype``, e.g. bf16: 16)."""
        return self.bits_per_element(num_kv_heads, head_dim) + 8 * self.table.element_size()

    def match(self, x: torch.Tensor) -> torch.Tensor:
        """Row ids ``[T, H]`` nearest to ``x [T, H, D]``; raises when one is not a table row.

        NOTE: every head of a token comes from the same row, so head 0 is searched and the
        others are only checked; a head that does not fit its token's row is searched on its own.
        Only head 0's float32 search copy is kept (the table's bytes again at float32 for one
        head, not for all); a misfit head's copy is built for its search and dropped. Each
        search scores the same float32 values in the same shapes either way: the same ids.
        """
        search, sq_norms = self._search_tables(x.device)
        first = self._nearest(x[:, :1], search, sq_norms)  # [T, 1]
        ids = first.expand(-1, x.shape[1]).clone()
        error = self._error(x, ids)
        misfit = (error > self.tolerance).any(0).nonzero().flatten().tolist()
        for h in misfit:
            head, head_norms = self._head_search(h, x.device)
            ids[:, h] = self._nearest(x[:, h:h + 1], head, head_norms)[:, 0]
        if misfit:
            error = self._error(x, ids)
        worst = float(error.max()) if error.numel() else 0.0
        if worst > self.tolerance:
            raise CodecInputError(
                f"layer-0 K/V of a token match no vocabulary row (relative error {worst:.3g} > "
                f"{self.tolerance}): the input is not a plain token sequence of the calibrated "
                "model (prompt embeddings? adapters on layer 0?)")
        return ids

    @staticmethod
    def _nearest(x: torch.Tensor, search: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
        """``x [T, h, D]`` against ``search [h, vocab, D]`` -> nearest row ids ``[T, h]``."""
        ids = torch.empty(x.shape[:2], dtype=torch.long, device=x.device)
        for start in range(0, x.shape[0], SEARCH_CHUNK):
            part = x[start:start + SEARCH_CHUNK].transpose(0, 1)  # [h, t, D]
            scores = sq_norms[:, None, :] - 2 * torch.bmm(part, search.transpose(1, 2))
            ids[start:start + SEARCH_CHUNK] = scores.argmin(-1).transpose(0, 1)
        return ids

    def _error(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Relative L2 error ``[T, H]`` of ``x [T, H, D]`` against rows ``ids [T, H]``."""
        heads = torch.arange(x.shape[1], device=x.device)
        rows = self.table.to(x.device)[ids, heads].float()  # [T, H, D]
        return (x - rows).norm(dim=-1) / rows.norm(dim=-1).clamp_min(1e-6)

    def _head_search(self, head: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Head ``head``'s search copy float32 ``[1, vocab, D]`` and squared norms ``[1, vocab]``."""
        search = self.table[:, head].to(device=device, dtype=torch.float32)[None].contiguous()
        return search, search.pow(2).sum(-1)

    def _search_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Head 0's search copy (:meth:`_head_search`), kept (``SEARCH_HEADS``)."""
        if self._search is None or self._search.device != torch.device(device):
            self._search, self._sq_norms = self._head_search(0, device)
        return self._search, self._sq_norms


def relative_error(table: torch.Tensor, ids: torch.Tensor, x: torch.Tensor) -> float:
    """Relative L2 error of ``table[ids]`` against ``x [N, H, D]``."""
    rows = table[ids].float()
    return float((rows - x.float()).norm() / x.float().norm().clamp_min(1e-12))


def verify(table: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor, keys: torch.Tensor,
           values: torch.Tensor, tolerance: float) -> tuple[bool, str]:
    """Does layer 0 depend on the token id alone? ``table`` (K, V) ``[vocab, H, D]`` against
    the K/V ``[N, H, D]`` the model produced for ``ids [N]`` inside real sequences."""
    errors = (relative_error(table[0], ids, keys), relative_error(table[1], ids, values))
    ok = max(errors) <= tolerance
    verdict = "verified" if ok else f"refused (> {tolerance}): layer 0 depends on more than the token"
    return ok, (f"layer-0 K/V from the token id: relative error K {errors[0]:.2e}, "
                f"V {errors[1]:.2e} on {ids.numel()} tokens, {verdict}")
