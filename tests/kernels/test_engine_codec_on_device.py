"""The data path the attention backend calls (:class:`EngineCodec`: write, reconstruct, fused
decode with exact sinks, the cross-layer hand-ups and the sink table), with pages on the
kernels' device and the Triton kernels, against the same engine on CPU with the torch reference.

On a GPU this is the backend's device handling without vLLM (the GPU check machine has no
vLLM); on CPU the kernels run interpreted. Synthetic calibrations of two layers.
"""

import pytest
import torch

pytest.importorskip("pydantic", reason="the engine's config needs pydantic (not on every GPU machine)")
pytest.importorskip("safetensors", reason="calibrations are stored as safetensors")

from tests.codec.synthetic import synthetic_calibration  # noqa: E402
from tests.kernels.transform_helpers import THETA  # noqa: E402
from vllm_seqkv.config import SeqKVConfig  # noqa: E402
from vllm_seqkv.integration.engine_codec import EngineCodec  # noqa: E402
from vllm_seqkv.integration.reads import plan_reads  # noqa: E402

HEADS, DIM, BLOCK = 2, 32, 16
LENGTHS = [1, 5, 40]
TABLE = torch.tensor([[0, 0, 0], [1, 0, 0], [2, 3, 4]], dtype=torch.int32)


def build_engine(preset, tmp_path) -> EngineCodec:
    path = tmp_path / f"{preset}.safetensors"
    if not path.exists():
        synthetic_calibration(preset, 2, HEADS, DIM).save(path)
    config = SeqKVConfig(kv_cache_backend="seqkv", preset=preset, calibration=str(path))
    return EngineCodec(config, str(tmp_path), HEADS, DIM, THETA)


def write_all(engine, pages, kv, device):
    """Every sequence's tokens into both layers, as the backend's KV update does per layer."""
    for layer, page in enumerate(pages):
        engine.chain.register(layer, page)
    for b, length in enumerate(LENGTHS):
        positions = torch.arange(length, device=device)
        slots = TABLE[b].to(device).long()[positions // BLOCK] * BLOCK + positions % BLOCK
        for layer, page in enumerate(pages):
            key, value = (t[b].to(device) for t in kv[layer])
            engine.write(layer, page, slots, engine.to_code_frame(key, positions), value)
            engine.sinks.record(layer, slots // BLOCK, slots % BLOCK, positions, key, value)


def read_all(engine, pages, device):
    """Per layer and sequence, the backend's read: chunks of sequences (here sequences 0 and 1
    together, 2 alone), each reconstructed in one call (cross-layer: handed up)."""
    chunks = plan_reads(list(range(len(LENGTHS))), LENGTHS, TABLE, BLOCK, device, rows_per_chunk=8)
    assert [chunk.seqs for chunk in chunks] == [[0, 1], [2]]
    out = []
    for layer, page in enumerate(pages):
        rows = []
        for chunk in chunks:
            previous = engine.chain.below(layer, chunk.key, chunk.slots)
            rec = engine.reconstruct(layer, page, chunk.blocks, chunk.rows, previous)
            if engine.codec.cross_layer:
                engine.chain.keep(layer, chunk.key, rec)
            rows.extend(tuple(t[chunk.gather][r0:r1].cpu() for t in rec)
                        for r0, r1 in zip(chunk.starts[:-1], chunk.starts[1:]))
        out.append(rows)
    return out


@pytest.mark.parametrize("preset", ["seqkv-3-nox", "seqkv-3"])
def test_engine_codec_on_the_kernels_device_matches_the_cpu_reference(preset, device, tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    kv = [tuple([torch.randn(n, HEADS, DIM, generator=gen) * s for n in LENGTHS] for s in (2.0, 1.0))
          for _ in range(2)]
    engines = {"torch": build_engine(preset, tmp_path), "triton": build_engine(preset, tmp_path)}
    where = {"torch": torch.device("cpu"), "triton": device}
    pages = {k: [torch.zeros(5, HEADS, BLOCK, e.slot_bytes, dtype=torch.uint8, device=where[k]) for _ in range(2)]
             for k, e in engines.items()}
    for kind, engine in engines.items():
        monkeypatch.setenv("SEQKV_KERNELS", kind)
        write_all(engine, pages[kind], kv, where[kind])
    for layer in range(2):  # threshold flips of float32 rounding only
        differ = (pages["triton"][layer].cpu() != pages["torch"][layer]).float().mean().item()
        assert differ < 1e-2, (layer, differ)

    # read the kernel-written pages both ways: kernels on the device vs the reference on CPU
    same_pages = [p.cpu() for p in pages["triton"]]
    monkeypatch.setenv("SEQKV_KERNELS", "torch")
    expected = read_all(engines["torch"], same_pages, torch.device("cpu"))
    monkeypatch.setenv("SEQKV_KERNELS", "triton")
    got = read_all(engines["triton"], pages["triton"], device)
    for layer in range(2):
        for (k, v), (ek, ev) in zip(got[layer], expected[layer]):
            torch.testing.assert_close(k, ek, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(v, ev, atol=1e-4, rtol=1e-4)

    fused = engines["triton"].fused_decode_params(1, device)
    assert (fused is None) == engines["triton"].codec.cross_layer  # cross-layer: decode reconstructs
    if fused is None:
        return
    query = torch.randn(len(LENGTHS), 2 * HEADS, DIM, generator=gen)
    own_k = torch.stack([k[-1] for k in kv[1][0]])
    own_v = torch.stack([v[-1] for v in kv[1][1]])
    args = (query, own_k, own_v)
    out = engines["triton"].decode_attention(1, fused, *(t.to(device) for t in args), pages["triton"][1],
                                             TABLE.to(device), LENGTHS, 0.3)
    monkeypatch.setenv("SEQKV_KERNELS", "torch")
    reference = engines["torch"].decode_attention(1, engines["torch"].kernel_params(1, torch.device("cpu")),
                                                  *args, same_pages[1], TABLE, LENGTHS, 0.3)
    torch.testing.assert_close(out.cpu(), reference, atol=1e-4, rtol=1e-4)
