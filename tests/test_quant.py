"""ggml's quantisers through pymoe._core: round trips, sizes, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from pymoe import _core

# bound on max |x - dequant(quant(x))| for N(0, 1) data, loose but meaningful per type
BOUNDS = {
    "f32": 0.0,
    "f16": 2e-3,
    "bf16": 2e-2,
    "q8_0": 0.03,
    "q6_K": 0.1,
    "q5_K": 0.2,
    "q4_K": 0.4,
    "q4_0": 0.5,
    "iq4_xs": 0.5,
    "q3_K": 0.9,
    "q2_K": 1.6,
}


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((96, 512)).astype(np.float32)


@pytest.mark.parametrize("typ", sorted(BOUNDS))
def test_round_trip(data, typ):
    q = _core.quantize(data, typ, n_threads=2)
    assert q.dtype == np.uint8 and q.shape == (96, _core.row_size(typ, 512))
    back = _core.dequantize(q, typ, 512)
    assert back.shape == data.shape
    assert float(np.abs(back - data).max()) <= BOUNDS[typ]
    # threads split rows; the bytes must not depend on how
    np.testing.assert_array_equal(q, _core.quantize(data, typ, n_threads=1))


def test_every_listed_type_quantizes(data):
    for typ in _core.quant_types():
        info = _core.type_info(typ)
        assert info["can_quantize"]
        cols = 512 if 512 % info["block_size"] == 0 else info["block_size"] * 2
        x = np.ascontiguousarray(data[:4, :cols]) if cols <= 512 else np.ones((4, cols), np.float32)
        back = _core.dequantize(_core.quantize(x, typ), typ, cols)
        assert np.isfinite(back).all()


def test_refusals(data):
    with pytest.raises(ValueError, match="importance matrix"):
        _core.quantize(data, "iq2_xxs")
    with pytest.raises(ValueError, match="multiple of its block size"):
        _core.quantize(np.ascontiguousarray(data[:, :100]), "q4_K")
    with pytest.raises(ValueError, match="unknown ggml type"):
        _core.quantize(data, "q9_Z")
    with pytest.raises(ValueError, match="whole number"):
        _core.dequantize(np.zeros(100, np.uint8), "q4_K", 256)
