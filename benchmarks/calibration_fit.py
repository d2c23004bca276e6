"""Speed of the transform codec's fit against the fit as first written, same process, same capture.

    python -m benchmarks.calibration_fit [--model tiny] [--preset seqkv-f4] [--repeats 1]

Captures the model's calibration activations through vLLM once (``DEFAULT_TOKENS`` of the
shipped general set, as ``python -m vllm_seqkv.calibrate`` does), then times, alternately,
the preset's fit (what the CLI runs after the capture) and :func:`fit_calibration_before` (the
fit of commit f481030, kept below verbatim as the baseline: every quantizer width of every
component, each width sorting its samples again, 60 Lloyd-Max iterations, one head and one
stream at a time, torch's default thread count), and checks that both give identical tensors.
Records ``benchmarks/calibration_fit.json``; the load average is recorded (these cores are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from vllm_seqkv.codec.base import CodecInputError
from vllm_seqkv.codec.crosslayer import LinearPredictor
from vllm_seqkv.codec.transform import MAX_BITS, Transform, TransformCodec, rope_pair_covariance


def lloyd_max_before(samples: torch.Tensor, bits: int, iterations: int = 60):
    x, _ = samples.double().sort(dim=-1)
    rows, n = x.shape
    levels = 1 << bits
    zero = torch.zeros(rows, 1, dtype=torch.float64)
    cum = torch.cat([zero, x.cumsum(-1)], -1)
    cum_sq = torch.cat([zero, (x * x).cumsum(-1)], -1)
    quantile = ((torch.arange(levels, dtype=torch.float64) + 0.5) / levels * n).long().clamp(max=n - 1)
    centers = x[:, quantile]
    for _ in range(iterations):
        cuts = torch.searchsorted(x, ((centers[:, 1:] + centers[:, :-1]) / 2).contiguous())
        bounds = torch.cat([zero.long(), cuts, torch.full((rows, 1), n)], -1)
        count = (bounds[:, 1:] - bounds[:, :-1]).double()
        total = cum.gather(1, bounds[:, 1:]) - cum.gather(1, bounds[:, :-1])
        centers = torch.where(count > 0, total / count.clamp_min(1), centers).sort(-1).values
    cuts = torch.searchsorted(x, ((centers[:, 1:] + centers[:, :-1]) / 2).contiguous())
    bounds = torch.cat([zero.long(), cuts, torch.full((rows, 1), n)], -1)
    count = (bounds[:, 1:] - bounds[:, :-1]).double()
    total = cum.gather(1, bounds[:, 1:]) - cum.gather(1, bounds[:, :-1])
    total_sq = cum_sq.gather(1, bounds[:, 1:]) - cum_sq.gather(1, bounds[:, :-1])
    mse = (total_sq - 2 * centers * total + count * centers**2).sum(-1) / n
    return centers.float(), mse.clamp_min(0)


def allocate_bits_before(distortion: torch.Tensor, total_bits: int) -> torch.Tensor:
    dim = distortion.shape[0]
    gains = torch.cat([distortion[:, :-1] - distortion[:, 1:], torch.zeros(dim, 1, dtype=distortion.dtype)], -1)
    bits = torch.zeros(dim, dtype=torch.long)
    for _ in range(total_bits):
        i = int(torch.argmax(gains.gather(1, bits[:, None])))
        bits[i] += 1
    return bits


def _pair_basis_before(root: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    dim = cov.shape[-1]
    half = dim // 2
    u = torch.zeros_like(cov)
    for j in range(half):
        idx = torch.tensor([j, j + half])
        _, vecs = torch.linalg.eigh(cov[idx][:, idx])
        u[idx[:, None], idx[None, :]] = vecs.flip(1)
    return root @ u


def fit_transform_before(samples: torch.Tensor, metric: torch.Tensor, bits_per_element: float,
                         rope_pairs: bool = False) -> Transform:
    """BASELINE: ``fit_transform`` as of commit f481030 (see the module docstring)."""
    samples = samples.double()
    heads, dim = samples.shape[1:]
    mean = samples.mean(0)
    total = round(bits_per_element * dim / 8) * 8
    bases, allocations, all_levels = [], [], []
    for h in range(heads):
        evals, evecs = torch.linalg.eigh(metric[h].double())
        root = evecs @ torch.diag(evals.clamp_min(evals.max() * 1e-9).sqrt()) @ evecs.T
        centred = (samples[:, h] - mean[h]) @ root
        cov = centred.T @ centred / centred.shape[0]
        if rope_pairs:
            cov = rope_pair_covariance(cov)
            if not torch.equal(rope_pair_covariance(root), root):
                raise CodecInputError("rope_pairs needs a metric that does not mix RoPE pairs")
        _, u = torch.linalg.eigh(cov)
        basis = root @ u.flip(1)
        if rope_pairs:
            basis = _pair_basis_before(root, cov)
        z = ((samples[:, h] - mean[h]) @ basis).T.contiguous()
        levels = torch.zeros(MAX_BITS + 1, dim, 1 << MAX_BITS)
        distortion = torch.zeros(dim, MAX_BITS + 1, dtype=torch.float64)
        distortion[:, 0] = z.pow(2).mean(-1)
        for b in range(1, MAX_BITS + 1):
            lv, mse = lloyd_max_before(z, b)
            levels[b, :, : 1 << b] = lv
            distortion[:, b] = mse
        bits = allocate_bits_before(distortion, total)
        bases.append(basis)
        allocations.append(bits)
        all_levels.append(levels[bits, torch.arange(dim)])
    return Transform.from_padded(mean.float(), torch.stack(bases).float(), torch.stack(allocations),
                                 torch.stack(all_levels))


def fit_calibration_before(capture, preset) -> dict[str, torch.Tensor]:
    """BASELINE: ``fit_transform_calibration`` as of commit f481030 (serial, a reconstruction
    of every layer whether or not a predictor reads it), with :func:`fit_transform_before`."""
    stacks: dict[str, list[torch.Tensor]] = {}
    table = capture.layer0_table if preset.layer0_tokens else None
    extra = {}
    if table is not None:
        extra = {name: t.to(torch.bfloat16).contiguous() for name, t in zip(("l0.k", "l0.v"), table)}
    previous = None
    for layer in range(capture.num_layers):
        recon = []
        for stream, x, metric, bits, pairs in (
                ("k", capture.keys[layer], capture.key_metric(layer), preset.key_bits, preset.key_rope_pairs),
                ("v", capture.values[layer], capture.value_metric[layer], preset.value_bits, False)):
            x = x.float()
            heads, dim = x.shape[1:]
            if preset.cross_layer and previous is not None:
                predictor = LinearPredictor.fit(previous, x)
                prediction = predictor.predict(previous, heads, dim)
            else:
                predictor = LinearPredictor(torch.zeros(2 * heads * dim, heads * dim), torch.zeros(heads * dim))
                prediction = torch.zeros_like(x)
            transform = fit_transform_before(x - prediction, metric, bits, rope_pairs=pairs)
            codec = TransformCodec(transform)
            recon.append(codec.decode(codec.encode(x - prediction)) + prediction)
            for name, value in (("mean", transform.mean), ("basis", transform.basis),
                                ("bits", transform.bits.to(torch.int32)), ("levels", transform.padded_levels()),
                                ("pred_w", predictor.weight), ("pred_b", predictor.bias)):
                stacks.setdefault(f"{stream}.{name}", []).append(value)
        previous = (recon[0], recon[1])
        if layer == 0 and table is not None:
            previous = tuple(extra[n][capture.token_ids].float() for n in ("l0.k", "l0.v"))
    return {name: torch.stack(parts) for name, parts in stacks.items()} | extra


def timed(fit, *args) -> tuple[float, dict[str, torch.Tensor]]:
    started = time.monotonic()
    tensors = fit(*args)
    return time.monotonic() - started, tensors


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def main(argv: list[str] | None = None) -> None:
    import seqkv_fixtures as fixtures
    from vllm_seqkv import calibrate
    from vllm_seqkv.codec.presets import PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    parser.add_argument("--preset", default=calibrate.DEFAULT_PRESET)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/calibration_fit.json"))
    args = parser.parse_args(argv)
    command = "python -m benchmarks.calibration_fit " + shlex.join(sys.argv[1:] if argv is None else argv)
    model_dir = {"tiny": fixtures.tiny_model_dir, "smollm2": fixtures.smollm2_dir}[args.model]()
    preset = PRESETS[args.preset]
    capture = calibrate.capture(model_dir, calibrate.read_text(), calibrate.DEFAULT_TOKENS,
                                layer0_table=calibrate.needs_layer0_table(args.preset), progress=False)
    load_before = os.getloadavg()
    before, after, same = [], [], True
    for _ in range(args.repeats):
        seconds, old = timed(fit_calibration_before, capture, preset)
        before.append(seconds)
        seconds, new = timed(lambda: preset.fit(capture).tensors)
        after.append(seconds)
        same = same and identical(old, new)
    record = {
        "model": model_dir.name, "preset": args.preset, "tokens": capture.tokens,
        "layers": capture.num_layers, "kv_heads": capture.keys[0].shape[1], "head_dim": capture.keys[0].shape[2],
        "seconds_before": [round(s, 2) for s in before], "seconds_after": [round(s, 2) for s in after],
        "speedup": round(min(before) / min(after), 1), "identical": same,
        "torch_threads": torch.get_num_threads(), "device": f"cpu ({os.cpu_count()} cores, shared)",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "command": command,
    }
    print(json.dumps(record, indent=1))
    records = json.loads(args.json.read_text()) if args.json.exists() else []
    records = [r for r in records if (r["model"], r["preset"]) != (record["model"], record["preset"])]
    args.json.write_text(json.dumps([*records, record], indent=1) + "\n")
    if not same:
        raise SystemExit("the fit changed: its tensors differ from the baseline's")


if __name__ == "__main__":
    main()
