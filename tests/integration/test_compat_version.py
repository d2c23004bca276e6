"""The compat seam refuses a vLLM of another minor version with one clear line."""

import pytest

from vllm_seqkv.integration import compat


def test_installed_vllm_is_the_supported_minor():
    compat.check_version(compat.VLLM_VERSION)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0", "0.3.2"])
def test_other_minor_versions_are_refused_in_one_line(version):
    with pytest.raises(compat.UnsupportedVLLMError) as info:
        compat.check_version(version)
    message = str(info.value)
    assert "\n" not in message
    assert version in message and compat.SUPPORTED_MINOR in message


def test_patch_releases_of_the_supported_minor_pass():
    compat.check_version(compat.SUPPORTED_MINOR + ".7")
    compat.check_version(compat.SUPPORTED_MINOR + ".1+cpu")


def test_wrap_method_is_idempotent_and_keeps_descriptor_kinds():
    class Owner:
        @staticmethod
        def s(x):
            return x

        @classmethod
        def c(cls, x):
            return (cls, x)

        def m(self, x):
            return x

    calls = []

    def make(original):
        def wrapper(*args):
            calls.append(args[-1])
            return original(*args)
        return wrapper

    for _ in range(2):
        for name in ("s", "c", "m"):
            compat.wrap_method(Owner, name, make)
    assert Owner.s(1) == 1 and Owner.c(2) == (Owner, 2) and Owner().m(3) == 3
    assert calls == [1, 2, 3]
