import pytest

from vllm_seqkv.config import SeqKVConfig, SeqKVConfigError, from_additional_config, validate


def test_defaults_are_auto_and_frozen():
    config = from_additional_config(None)
    assert config.kv_cache_backend == "auto" and not config.enabled
    with pytest.raises(Exception):
        config.preset = "other"


def test_backend_from_top_level_key_and_options():
    config = from_additional_config({"kv_cache_backend": "seqkv", "seqkv": {"preset": "seqkv-4"}})
    assert config.enabled and config.preset == "seqkv-4"


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"kv_cache_backend": "bogus"}, "option 'kv_cache_backend'"),
        ({"preset": 3}, "option 'preset'"),
        ({"calibration": 7}, "option 'calibration'"),
        ({"presett": "seqkv-3"}, "unknown option 'presett'"),
        ({"preset": "seqkv-99"}, "option 'preset'"),
    ],
)
def test_bad_values_name_the_option(options, needle):
    with pytest.raises(SeqKVConfigError) as err:
        validate(options)
    message = str(err.value)
    assert needle in message
    assert "\n" not in message


def test_options_must_be_an_object():
    with pytest.raises(SeqKVConfigError, match="must be a JSON object"):
        from_additional_config({"seqkv": "fast"})


def test_every_field_is_documented_in_readme():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in SeqKVConfig.model_fields:
        assert f"`{name}`" in readme, f"README does not document option {name}"


def approximate(**fields):
    return {"kv_cache_backend": "seqkv", "cold_tier": {"approximate": fields}}


def test_approximate_reuse_needs_a_readable_gate_and_a_positive_budget(tmp_path):
    gate = tmp_path / "gate.json"
    gate.write_text('{"model": "m", "kl_by_substitutions": {"1": 0.001}}')
    (tmp_path / "bad.json").write_text('{"model": "m"}')
    config = validate(approximate(gate=str(gate), max_kl=0.01))
    assert config.cold_tier.approximate.salt_prefix == "approx:"
    assert validate({"kv_cache_backend": "seqkv", "cold_tier": {}}).cold_tier.approximate is None
    for fields, needle in [
        ({"gate": str(tmp_path / "none.json"), "max_kl": 0.01}, "no such file"),
        ({"gate": str(tmp_path), "max_kl": 0.01}, "cannot read it"),
        ({"gate": str(tmp_path / "bad.json"), "max_kl": 0.01}, "not a quality gate"),
        ({"gate": str(gate), "max_kl": 0}, "option 'cold_tier.approximate.max_kl'"),
        ({"gate": str(gate)}, "option 'cold_tier.approximate.max_kl'"),
        ({"gate": str(gate), "max_kl": 0.01, "salt_prefix": "a/b:"}, "refuses cache salts"),
        ({"gate": str(gate), "max_kl": 0.01, "salt": "x"},
         "unknown option 'cold_tier.approximate.salt' (valid options: gate, max_index_blocks"),
    ]:
        with pytest.raises(SeqKVConfigError, match=needle.replace("(", r"\(")):
            validate(approximate(**fields))


def test_every_additional_config_in_the_readme_is_valid(monkeypatch):
    import json
    import re
    from pathlib import Path

    root = Path(__file__).parents[1]
    monkeypatch.chdir(root)  # the examples name repository files (the approximate-reuse gate)
    blocks = re.findall(r"```bash\n(.*?)```", (root / "README.md").read_text(), re.S)
    found = [c for b in blocks for c in re.findall(r"--additional-config '(.*?)'", b, re.S)]
    assert len(found) >= 3
    for text in found:
        from_additional_config({"kv_cache_backend": "seqkv", **json.loads(text)})
