"""Argument checks shared by the kernel wrappers: clear errors instead of wrong memory reads."""

from __future__ import annotations

import torch


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


class KernelArgumentError(ValueError):
    """A kernel was given a tensor of the wrong shape, dtype, layout or device."""


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise KernelArgumentError(message)


def check_tensor(name: str, t: torch.Tensor, shape: tuple, dtypes: tuple, device: torch.device,
                 inner_contiguous: bool = True) -> None:
    """``shape`` entries of None match any size. NOTE: the messages are built only on failure:
    the wrappers run this per call and layer, on the decode step's critical path."""
    if not isinstance(t, torch.Tensor):
        raise KernelArgumentError(f"{name}: expected a tensor, got {type(t).__name__}")
    actual = t.shape
    if len(actual) != len(shape):
        _wrong_shape(name, shape, actual)
    for want, got in zip(shape, actual):  # NOTE: a plain loop: a generator costs ~1 us per call
        if want is not None and want != got:
            _wrong_shape(name, shape, actual)
    if t.dtype not in dtypes:
        raise KernelArgumentError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.device != device:
        raise KernelArgumentError(f"{name}: on {t.device}, expected {device} (all kernel inputs on one device)")
    if inner_contiguous and actual and t.stride(-1) != 1 and actual[-1] != 1:
        raise KernelArgumentError(f"{name}: last dimension must be contiguous, strides {t.stride()}")


def _wrong_shape(name: str, shape: tuple, actual) -> None:
    raise KernelArgumentError(f"{name}: expected shape {tuple('*' if s is None else s for s in shape)}, "
                              f"got {tuple(actual)}")


def check_pages(pages: torch.Tensor, params) -> None:
    """``pages`` uint8 ``[num_blocks, num_kv_heads, block_size, slot_bytes]`` of either format's ``params``."""
    check_tensor("pages", pages, (None, params.num_kv_heads, None, params.slot_bytes),
                 (torch.uint8,), pages.device)
    expect(params.device == pages.device,
           f"layer params on {params.device} but pages on {pages.device}: call params.to(device)")


def check_decode_inputs(query, own_k, own_v, block_table, seq_lens, rope, skip_first: int,
                        heads: int, dim: int, device: torch.device) -> None:
    """The decode-attention inputs every implementation takes: query ``[B, Hq, D]`` with
    ``Hq`` a multiple of ``heads``, own_k/own_v ``[B, H, D]`` (both None: no own token, see
    :func:`~.cpu_ops.transform_decode_attention_cpp`), block_table ``[B, max_blocks]``,
    seq_lens ``[B]`` (contiguous), a float32 ``rope`` table ``[P, D]`` or None."""
    check_tensor("query", query, (None, None, dim), FLOAT_DTYPES, device)
    batch, q_heads = query.shape[:2]
    expect(q_heads % heads == 0, f"query heads {q_heads} are not a multiple of kv heads {heads}")
    expect((own_k is None) == (own_v is None), "own_k/own_v: pass both or neither")
    if own_k is not None:
        check_tensor("own_k", own_k, (batch, heads, dim), FLOAT_DTYPES, device)
        check_tensor("own_v", own_v, (batch, heads, dim), FLOAT_DTYPES, device)
    check_tensor("block_table", block_table, (batch, None), INDEX_DTYPES, device)
    check_tensor("seq_lens", seq_lens, (batch,), INDEX_DTYPES, device)
    expect(seq_lens.is_contiguous(), "seq_lens must be contiguous")
    expect(block_table.numel() > 0 or batch == 0, "block_table is empty")
    expect(skip_first >= 0, f"skip_first must be >= 0, got {skip_first}")
    if rope is not None:
        check_tensor("rope", rope, (None, dim), (torch.float32,), device)
        expect(rope.is_contiguous(), "rope: must be contiguous")
