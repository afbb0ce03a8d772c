"""Bit packing in the GPTQ layout, checked against a plain-integer reference."""

import pytest
import torch

from quantlab.formats.packing import pack_cols, pack_rows, pack_unit, unpack_cols, unpack_rows


def reference_pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """One Python integer bit stream per column, LSB first, cut into 32-bit words (the order
    AutoGPTQ's packer produces for 2/3/4/8 bits, written independently here)."""
    n, m = codes.shape
    out = torch.zeros(n * bits // 32, m, dtype=torch.int64)
    for col in range(m):
        stream = 0
        for i in range(n):
            stream |= int(codes[i, col]) << (i * bits)
        for w in range(n * bits // 32):
            word = (stream >> (32 * w)) & 0xFFFFFFFF
            out[w, col] = word - (1 << 32) if word >= 1 << 31 else word
    return out.to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_rows_matches_reference_and_round_trips(bits):
    g = torch.Generator().manual_seed(bits)
    n = 2 * pack_unit(bits)
    codes = torch.randint(0, 2**bits, (n, 5), generator=g)
    codes[0, 0], codes[1, 0] = 2**bits - 1, 0  # extremes, incl. a set sign bit
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (n * bits // 32, 5)
    assert torch.equal(packed, reference_pack_rows(codes, bits))
    assert torch.equal(unpack_rows(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_cols_round_trip(bits):
    codes = torch.randint(0, 2**bits, (3, 64), generator=torch.Generator().manual_seed(0))
    packed = pack_cols(codes, bits)
    assert packed.shape == (3, 64 * bits // 32)
    assert torch.equal(packed, reference_pack_rows(codes.t(), bits).t())
    assert torch.equal(unpack_cols(packed, bits, 64), codes)


def test_known_4bit_word():
    # codes 1..8 in one word, LSB first: 0x87654321
    codes = torch.arange(1, 9).view(8, 1)
    assert pack_rows(codes, 4).item() == 0x87654321 - (1 << 32)


def test_rows_that_do_not_fill_words_are_rejected():
    with pytest.raises(ValueError):
        pack_rows(torch.zeros(10, 2, dtype=torch.int64), 3)
