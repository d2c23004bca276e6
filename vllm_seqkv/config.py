"""All plugin options: one frozen pydantic model, validated once at engine start-up.

Where options come from:
- CLI: ``vllm serve MODEL --kv-cache-backend seqkv`` (the plugin adds the flag) and
  ``--additional-config '{"seqkv": {"preset": "seqkv-3"}}'`` for the rest;
- Python: ``LLM(model, additional_config={"kv_cache_backend": "seqkv", "seqkv": {...}})``.

Both land in ``vllm_config.additional_config``; :func:`from_additional_config` turns that
dict into a :class:`SeqKVConfig` or raises :class:`SeqKVConfigError` naming the option.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# the preset `--kv-cache-backend seqkv` stores pages with (see vllm_seqkv.codec.presets);
# here so that loading the plugin imports neither torch nor the codecs
DEFAULT_PRESET = "seqkv-f4"

KV_CACHE_BACKENDS = ("auto", "seqkv")
BACKEND_KEY = "kv_cache_backend"
OPTIONS_KEY = "seqkv"


class SeqKVConfigError(ValueError):
    """A bad plugin option; the message names the option and what is allowed."""


class ApproximateReuseConfig(BaseModel):
    """Approximate prefix reuse (``cold_tier.approximate``): off unless given.

    A request opts in with a cache salt ``salt_prefix + T``: it may then be served the cold
    tier's blocks of tenant ``T`` (salt ``T``) that differ from its prompt in at most as many
    tokens as ``gate`` allows within ``max_kl``. Its own blocks are cached under its own salt,
    so requests that did not opt in never see approximate K/V.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    gate: str = Field(description="quality gate measured for this model (JSON with "
                      "kl_by_substitutions, as `python -m benchmarks.approx` writes it)")
    max_kl: float = Field(gt=0, description="KL budget, nats per token, of the next-token "
                          "distribution; the gate turns it into a number of substituted tokens")
    salt_prefix: str = Field(default="approx:", min_length=1,
                             description="cache-salt prefix by which a request opts in")
    max_index_blocks: int = Field(
        default=1 << 16, gt=0, description="bound on the blocks indexed for near matches, the "
        "oldest dropped beyond (scheduler memory: ~5 KB per 128-token block)")

    @field_validator("salt_prefix")
    @classmethod
    def _salt_prefix_sendable(cls, prefix: str) -> str:
        if any(c in prefix for c in "@/\\\0"):
            raise ValueError("vLLM refuses cache salts with '@', '/', '\\' or NUL")
        return prefix

    @field_validator("gate")
    @classmethod
    def _gate_readable(cls, path: str) -> str:
        from vllm_seqkv.plt.approximate import QualityGate

        try:
            QualityGate.load(path)
        except FileNotFoundError:
            raise ValueError("no such file (measure one with `python -m "
                             "benchmarks.approx --json PATH`)") from None
        except OSError as e:
            raise ValueError(f"cannot read it ({e.strerror})") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"not a quality gate ({type(e).__name__}: {e})") from None
        return path


class ColdTierConfig(BaseModel):
    """Where blocks evicted from vLLM's pages go (``additional_config["seqkv"]["cold_tier"]``).

    Turned into vLLM's ``kv_transfer_config`` (the seqkv KV connector) by the plugin.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["cpu", "disk", "redis"] = Field(
        default="cpu", description="cpu: process RAM; disk: one file per block under `path`; "
        "redis: a Redis/Valkey server at `url`")
    capacity_bytes: int = Field(default=1 << 30, gt=0,
                                description="bytes of coded blocks the tier holds (evicts beyond)")
    path: str | None = Field(default=None, description="directory of the disk tier")
    url: str = Field(default="redis://127.0.0.1:6379/0", description="server of the redis tier")
    entropy_coding: bool = Field(default=True, description="entropy-code the hot-code bytes "
                                 "(constriction ANS, lossless); false: store them raw")
    save_queue_bytes: int = Field(default=256 << 20, gt=0, description="bytes of block copies "
                                  "waiting for the background saver; beyond, saves are dropped")
    eviction: Literal["plt", "lru"] = Field(
        default="plt", description="which block the full tier drops: plt (the learned reuse "
        "policy over request prefixes, leaves first) or lru (least recently used)")
    approximate: ApproximateReuseConfig | None = Field(
        default=None, description="approximate prefix reuse for requests that opt in; null: "
        "exact reuse only")

    @model_validator(mode="after")
    def _disk_needs_path(self):
        if self.kind == "disk" and not self.path:
            raise ValueError("kind 'disk' needs a 'path' (a directory)")
        return self


class SeqKVConfig(BaseModel):
    """Options of the seqkv KV-cache backend (``additional_config["seqkv"]``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kv_cache_backend: Literal["auto", "seqkv"] = "auto"
    preset: str = Field(default=DEFAULT_PRESET, description="named codec preset")
    calibration: str | None = Field(
        default=None, description="calibration file; default: the one `python -m "
        "vllm_seqkv.calibrate MODEL` wrote for this model")
    auto_calibrate: bool = Field(
        default=True, description="when the model has no calibration for the preset, fit it "
        "at engine start (a `python -m vllm_seqkv.calibrate` subprocess through vLLM, minutes; "
        "written to the cache and reused); false: fail with the command to run instead")

    sink_table_bytes: int = Field(
        default=64 << 20, ge=0, description="bound on the exact sink rows (first token of each "
        "sequence: one entry per sequence-start block, or per distinct first token with a "
        "layer-0 token table) kept beside the pages; taken from vLLM's KV budget (at most one "
        "entry per block or token that can exist); beyond, sequence starts use their coded rows")
    cold_tier: ColdTierConfig | None = Field(
        default=None, description="cold tier for blocks evicted from the pages (KV connector); "
        "null: none")
    shared_prefix_min_saved_positions: int = Field(
        default=8192, ge=0, description="decode: read a prefix that n decoding sequences hold in "
        "the same blocks once per layer for all of them when its positions x (n - 1) (the "
        "positions not read again) reach this (CPU fused decode; BENCHMARKS.md, shared prefixes); "
        "0: whenever 2 sequences share 256 positions")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        from vllm_seqkv.codec.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown preset; choose from {', '.join(PRESETS) or '(none)'}")
        return name

    @model_validator(mode="after")
    def _cold_tier_needs_seqkv(self):
        if self.cold_tier is not None and self.kv_cache_backend != "seqkv":
            raise ValueError("cold_tier needs kv_cache_backend 'seqkv'")
        return self

    @property
    def enabled(self) -> bool:
        return self.kv_cache_backend == "seqkv"


def from_additional_config(additional_config: dict[str, Any] | None) -> SeqKVConfig:
    """Validate the plugin's part of vLLM's ``additional_config``."""
    additional_config = dict(additional_config or {})
    options = additional_config.get(OPTIONS_KEY) or {}
    if not isinstance(options, dict):
        raise SeqKVConfigError(
            f"additional_config[{OPTIONS_KEY!r}] must be a JSON object of seqkv options, "
            f"got {type(options).__name__}"
        )
    backend = additional_config.get(BACKEND_KEY, options.get(BACKEND_KEY, "auto"))
    return validate({**options, BACKEND_KEY: backend})


def validate(options: dict[str, Any]) -> SeqKVConfig:
    try:
        return SeqKVConfig(**options)
    except ValidationError as exc:
        raise SeqKVConfigError(_one_line(exc)) from None


def _one_line(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        option = ".".join(str(p) for p in err["loc"]) or "<config>"
        if err["type"] == "extra_forbidden":
            model = _model_at(err["loc"][:-1])
            allowed = ", ".join(sorted(model.model_fields))
            problems.append(f"unknown option '{option}' (valid options: {allowed})")
        else:
            problems.append(f"option '{option}': {err['msg']} (got {err.get('input')!r})")
    return "invalid seqkv config: " + "; ".join(problems)


def _model_at(loc: tuple) -> type[BaseModel]:
    """The options model at ``loc`` (a path of field names) under :class:`SeqKVConfig`."""
    model: type[BaseModel] = SeqKVConfig
    for name in loc:
        field = model.model_fields.get(str(name))
        inner = next((a for a in getattr(field.annotation, "__args__", (field.annotation,))
                      if isinstance(a, type) and issubclass(a, BaseModel)), None) if field else None
        if inner is None:
            break
        model = inner
    return model
