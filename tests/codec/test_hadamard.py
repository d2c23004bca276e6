import pytest
import torch

from vllm_seqkv.codec.base import CodecInputError
from vllm_seqkv.codec.hadamard import RandomizedHadamard, fwht


def sylvester(dim):
    h = torch.ones(1, 1)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("dim", [1, 2, 8, 64, 128])
def test_fwht_equals_the_hadamard_matrix(dim):
    x = torch.randn(5, dim, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ sylvester(dim).double().T)


@pytest.mark.parametrize("dim", [16, 64, 256])
def test_rotation_is_orthogonal_and_inverts(dim):
    rot = RandomizedHadamard(dim, seed=3)
    matrix = rot.forward(torch.eye(dim, dtype=torch.float64))  # rows = R e_i
    assert torch.allclose(matrix @ matrix.T, torch.eye(dim, dtype=torch.float64), atol=1e-12)
    x = torch.randn(4, 3, dim)
    assert torch.allclose(rot.inverse(rot.forward(x)), x, atol=1e-5)
    assert torch.allclose(rot.forward(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


def test_signs_depend_on_seed_only():
    assert torch.equal(RandomizedHadamard(64, 7).signs, RandomizedHadamard(64, 7).signs)
    assert not torch.equal(RandomizedHadamard(64, 7).signs, RandomizedHadamard(64, 8).signs)


@pytest.mark.parametrize("dim", [0, 48, 80])
def test_non_power_of_two_is_a_clear_error(dim):
    with pytest.raises(CodecInputError, match="power-of-two"):
        RandomizedHadamard(dim)
    if dim:
        with pytest.raises(CodecInputError, match="power-of-two"):
            fwht(torch.randn(2, dim))
