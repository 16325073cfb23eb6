import pytest
import torch

from memoir_kernels import num_words, pack_bits, unpack_bits


@pytest.mark.parametrize("dim", [pytest.param(d, id=f"D{d}") for d in (1, 7, 63, 64, 65, 130, 1536)])
def test_pack_unpack_round_trip(dim):
    mask = torch.rand(5, dim) < 0.3
    bits = pack_bits(mask)
    assert bits.shape == (5, num_words(dim)) and bits.dtype == torch.int64
    assert torch.equal(unpack_bits(bits, dim), mask)


def test_bit_positions_follow_the_layout():
    mask = torch.zeros(1, 130, dtype=torch.bool)
    mask[0, [0, 5, 63, 64, 129]] = True
    bits = pack_bits(mask)[0].tolist()
    assert bits[0] == (1 << 0) | (1 << 5) | -(1 << 63)  # bit 63 is the sign bit of word 0
    assert bits[1] == 1  # position 64 -> word 1, bit 0
    assert bits[2] == 1 << 1  # position 129 -> word 2, bit 1; padding bits stay zero


def test_unpack_rejects_wrong_word_count():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(1, 3, dtype=torch.int64), 64)
