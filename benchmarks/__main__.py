"""``python -m benchmarks COMMAND [ARGS]``: every benchmark of vllm-seqkv, run from the repo root.

``quality`` (the ruler) and ``entropy`` are parsed here; every other command is a module of
this package with its own ``--help`` (``python -m benchmarks load --help`` =
``python -m benchmarks.load --help``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

QUICK_CONTEXT = 128
QUICK_TOKENS = 1024
DEFAULT_CONTEXT = 2048
DEFAULT_TOKENS = 2048  # per text: one window (a 2048-token run of SmolLM2 takes ~20 s on 2 cores)
DEFAULT_CALIB_TOKENS = 24576  # = vllm_seqkv.calibrate.DEFAULT_TOKENS (its files are reused)
CHAT_PROMPTS = 60
CHAT_MAX_NEW = 64
QUICK_CHAT_PROMPTS = 6
QUICK_CHAT_MAX_NEW = 16
VLLM_PEERS = ("auto", "fp8_e4m3", "fp8_e5m2")
# the default run: every peer baseline, the chain preset, its no-chain ablation and the fusable
# presets (other ablations: --codecs); the chat suite on the main ones (--chat-codecs)
DEFAULT_PRESETS = ("seqkv-3", "seqkv-3-nox", "seqkv-f2.5", "seqkv-f3", "seqkv-f3.5", "seqkv-f4")
CHAT_CODECS = ("bf16", "fp8-e4m3", "kivi-4", "turbo-3", "seqkv-3", "seqkv-3-nox", "seqkv-f3", "seqkv-f4")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="local HF checkpoint folder (default: SmolLM2-135M fixture)")
    parser.add_argument("--text", type=Path, help="evaluation text (default: held-out test split)")
    parser.add_argument("--calib-text", type=Path, help="calibration text, plain or .jsonl chats "
                        "(default: the general set shipped with the package)")
    parser.add_argument("--context", type=int, help=f"tokens per window (default {DEFAULT_CONTEXT})")
    parser.add_argument("--tokens", type=int, help=f"evaluated tokens in all (default {DEFAULT_TOKENS})")
    parser.add_argument("--calib-tokens", type=int, help=f"calibration tokens (default {DEFAULT_CALIB_TOKENS})")
    parser.add_argument("--json", type=Path, help="JSON output")
    parser.add_argument("--markdown", type=Path, help="BENCHMARKS.md to update (default: BENCHMARKS.md; "
                        "with --quick: none)")
    parser.add_argument("--no-markdown", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny model, context {QUICK_CONTEXT}, {QUICK_TOKENS} tokens, outputs in a temp folder")


# command -> module of this package whose main(argv) runs it
MODULES = {
    "load": "load", "isolation": "isolation", "approx": "approx", "approx-vllm": "approx_vllm",
    "vllm-path": "vllm_path", "plt": "plt", "replay": "replay", "connector": "connector",
    "cpu-decode": "cpu_decode", "tpot": "tpot", "gpu-kernels": "gpu_kernels", "calibration": "calibration",
    "cpu-decode-profile": "cpu_decode_profile", "tpot-profile": "tpot_profile", "models": "models",
    "memory": "memory",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in MODULES.items():
        sub.add_parser(name, help=f"benchmarks/{module}.py (its own --help)", add_help=False)
    quality = sub.add_parser("quality", help="perplexity / KL / attention error of every codec")
    _common(quality)
    quality.add_argument("--codecs", help="comma-separated codec names or 'all' (default: every baseline, "
                         f"{', '.join(DEFAULT_PRESETS)})")
    quality.add_argument("--plot", type=Path, help="Pareto plot PNG")
    quality.add_argument("--extra-texts", help="comma-separated more long-context texts, reported apart "
                         "(default: the English prose test split when built; 'none' for none)")
    quality.add_argument("--no-chat", action="store_true", help="skip the chat suite")
    quality.add_argument("--chat-prompts", type=int, help=f"conversations of the chat suite (default all "
                         f"{CHAT_PROMPTS}; --quick {QUICK_CHAT_PROMPTS})")
    quality.add_argument("--chat-samples", type=int, help="T=1 answers per prompt (default 1)")
    quality.add_argument("--chat-max-new", type=int, help=f"answer length cap (default {CHAT_MAX_NEW}; "
                         f"--quick {QUICK_CHAT_MAX_NEW})")
    quality.add_argument("--chat-codecs", help="codecs on the chat suite (default: those of --codecs among "
                         f"{', '.join(CHAT_CODECS)}; 'all': every one of --codecs)")
    quality.add_argument("--vllm-peers", help="comma-separated peers run through the CPU vLLM engine "
                         "(KV dtypes such as fp8_e4m3, or seqkv preset names; default "
                         f"{','.join(VLLM_PEERS)},<default preset>; --quick and 'none': none)")
    entropy = sub.add_parser("entropy", help="residual entropy per predictor vs the paper's bound")
    _common(entropy)
    return parser


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults; ``--quick`` switches model, sizes and output folder."""
    import seqkv_fixtures as fixtures

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    out_dir = Path(tempfile.gettempdir()) / "seqkv-bench-quick" if args.quick else Path("benchmarks")
    args.model = args.model or (fixtures.tiny_model_dir() if args.quick else fixtures.smollm2_dir())
    args.text = args.text or fixtures.corpus_path("test")
    from vllm_seqkv import calibrate

    args.calib_text = args.calib_text or calibrate.GENERAL_TEXT
    if args.calib_text.resolve() == args.text.resolve():
        raise SystemExit("--calib-text must differ from --text (calibration never sees the evaluation text)")
    args.context = args.context or (QUICK_CONTEXT if args.quick else DEFAULT_CONTEXT)
    args.tokens = args.tokens or (QUICK_TOKENS if args.quick else DEFAULT_TOKENS)
    args.calib_tokens = args.calib_tokens or (4 * QUICK_CONTEXT if args.quick else DEFAULT_CALIB_TOKENS)
    args.json = args.json or out_dir / f"{args.command}.json"
    if getattr(args, "plot", None) is None and args.command == "quality":
        args.plot = out_dir / "quality.png"
    if args.no_markdown or (args.quick and args.markdown is None):
        args.markdown = None
    else:
        args.markdown = args.markdown or Path("BENCHMARKS.md")
    return args


def _names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [] if value.strip() == "none" else [n.strip() for n in value.split(",") if n.strip()]


def _extra_texts(args: argparse.Namespace) -> list[Path]:
    import seqkv_fixtures as fixtures

    if args.extra_texts is not None:
        return [Path(p) for p in _names(args.extra_texts)]
    try:
        return [fixtures.prose_path("test")]
    except (AttributeError, fixtures.FixtureMissingError):
        print("no English prose fixture built: long-context suite on one text only", file=sys.stderr)
        return []


def run_quality(args: argparse.Namespace, command: str) -> None:
    from benchmarks import report
    from benchmarks.chat import ChatSettings
    from benchmarks.quality import QualitySettings, default_preset, evaluate
    from vllm_seqkv.codec import codec_names

    from vllm_seqkv.codec.baselines import BASELINES

    names = _names(args.codecs) or [*BASELINES, *DEFAULT_PRESETS]
    if names == ["all"]:
        names = codec_names()
    chat_codecs = _names(args.chat_codecs)
    if chat_codecs is None:
        chat_codecs = [n for n in names if n in CHAT_CODECS or n == default_preset()] or names
    elif chat_codecs == ["all"]:
        chat_codecs = names
    chat = None if args.no_chat else ChatSettings(
        max_new_tokens=args.chat_max_new or (QUICK_CHAT_MAX_NEW if args.quick else CHAT_MAX_NEW),
        samples=1 if args.chat_samples is None else args.chat_samples,
        prompts=args.chat_prompts or (QUICK_CHAT_PROMPTS if args.quick else CHAT_PROMPTS))
    peers = _names(args.vllm_peers)
    if peers is None:
        peers = [] if args.quick else [*VLLM_PEERS, default_preset()]
    settings = QualitySettings(model_dir=args.model, text=args.text, calib_text=args.calib_text,
                               context=args.context, tokens=args.tokens, codecs=names,
                               calib_tokens=args.calib_tokens, command=command,
                               extra_texts=_extra_texts(args), chat=chat,
                               chat_codecs=chat_codecs, vllm_peers=peers)
    start = time.time()
    records = evaluate(settings)
    seconds = time.time() - start
    report.write_json(args.json, records)
    first = records[0]
    report.quality_plot(records, args.plot, f"{first['model']}, long context {first['context']}, "
                        f"{first['tokens']} tokens per text; chat suite")
    markdown = report.quality_markdown(records, seconds)
    if args.markdown:
        report.replace_section(args.markdown, report.QUALITY_SECTION, markdown)
    print(markdown)
    print(f"wrote {args.json}, {args.plot}" + (f", {args.markdown}" if args.markdown else ""))


def run_entropy(args: argparse.Namespace, command: str) -> None:
    from benchmarks import report
    from benchmarks.entropy import EntropySettings, entropy_markdown, measure

    settings = EntropySettings(model_dir=args.model, text=args.text, calib_text=args.calib_text,
                               context=args.context, tokens=args.tokens, calib_tokens=args.calib_tokens,
                               command=command)
    result = measure(settings)
    report.write_json(args.json, result)
    markdown = entropy_markdown(result)
    if args.markdown:
        report.replace_section(args.markdown, report.ENTROPY_SECTION, markdown)
    print(markdown)
    print(f"wrote {args.json}" + (f", {args.markdown}" if args.markdown else ""))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in MODULES:
        import importlib

        importlib.import_module(f"benchmarks.{MODULES[argv[0]]}").main(argv[1:])
        return
    args = _resolve(build_parser().parse_args(argv))
    command = shlex.join(["python", "-m", "benchmarks", *argv])
    {"quality": run_quality, "entropy": run_entropy}[args.command](args, command)


if __name__ == "__main__":
    main()
