"""The byte formatter every command prints sizes with."""

from __future__ import annotations

from pymoe._units import GiB, KiB, MiB, TiB, format_bytes
from pymoe.offload import parse_size


def test_format_bytes():
    assert format_bytes(0) == "0 B" and format_bytes(1023) == "1023 B"
    assert format_bytes(KiB) == "1.00 KiB" and format_bytes(1536) == "1.50 KiB"
    assert format_bytes(MiB - 1) == "1024.00 KiB"  # the unit follows the value, not its rounding
    assert format_bytes(330 * MiB) == "330.00 MiB" and format_bytes(1.2 * GiB) == "1.20 GiB"
    assert format_bytes(3 * TiB) == "3.00 TiB" and format_bytes(5000 * TiB) == "5000.00 TiB"
    assert format_bytes(-2 * KiB) == "-2.00 KiB"
    # what it prints, parse_size reads back (to the printed precision)
    for n in (512, 6 * GiB, 123456789):
        assert abs(parse_size(format_bytes(n).replace(" ", "")) - n) <= 0.005 * n
