"""Byte sizes for people: the one formatter the commands share (the parser,
`parse_size`, is in offload.py with the budgets it reads)."""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_STEPS = (("KiB", KiB), ("MiB", MiB), ("GiB", GiB), ("TiB", TiB))


def format_bytes(n: float) -> str:
    """1536 -> '1.50 KiB': the largest binary unit that keeps the number at
    least 1 (bytes as a whole number, TiB the largest)."""
    if abs(n) < KiB:
        return f"{n:.0f} B"
    for unit, size in _STEPS[:-1]:
        if abs(n) < size * KiB:
            return f"{n / size:.2f} {unit}"
    return f"{n / TiB:.2f} TiB"
