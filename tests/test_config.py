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
