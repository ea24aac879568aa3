"""The engine under I/O faults (the platform layer's fault injector): a read
that fails or comes back short is reported, and changes no logits -- no slot
keeps bytes that did not land."""

from __future__ import annotations

import numpy as np
import pytest

from pymoe import Model, _core


@pytest.fixture(autouse=True)
def _no_fault_left_armed():
    yield
    _core.io_fault_clear()


def _tokens(n: int, vocab: int, seed: int = 11) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


@pytest.mark.parametrize("kind", ["eio", "short"])
def test_a_failed_slot_read_poisons_no_slot(tiny, kind):
    """A foreground load that fails: the step falls back to the model's tensors, the error is
    raised after the decode, and the slots the step had taken are free again -- the next identical
    call loads them for real instead of counting them as hits and computing from stale bytes."""
    path = tiny.gguf("mixtral")
    with Model(path, cache_type="f32", offload="off") as m:
        tokens = _tokens(24, m.n_vocab)
        ref = m.logits(tokens)
    on = {"cache_type": "f32", "offload": "on", "offload_tier": "disk", "cpu_assist": False}
    with Model(path, expert_budget=0.5, **on) as m:
        m.logits(tokens[:2])  # start-up (its bandwidth measurement reads too) before the fault is armed
        m.reset_stats()
        _core.io_fault(kind, 1, 2)  # the next two read requests fail
        with pytest.raises(RuntimeError, match="computed from the model file instead"):
            m.logits(tokens)
        _core.io_fault_clear()
        np.testing.assert_array_equal(m.logits(tokens), ref)
        assert m.offload_stats()["loads"] > 0


def test_an_interrupted_read_is_invisible(tiny):
    path = tiny.gguf("mixtral")
    with Model(path, cache_type="f32", offload="off") as m:
        tokens = _tokens(24, m.n_vocab)
        ref = m.logits(tokens)
    with Model(path, cache_type="f32", offload="on", offload_tier="disk", expert_budget=0.5, cpu_assist=False) as m:
        m.logits(tokens[:2])
        _core.io_fault("eintr", 1, 50)
        np.testing.assert_array_equal(m.logits(tokens), ref)


def test_failed_background_loads_change_no_logits(tiny):
    """Prefetching's background loads failing now and then: their slots are freed, the decode
    reports the failure, and token-by-token logits (the step retried) equal the reference's."""
    path = tiny.gguf("mixtral")
    with Model(path, cache_type="f32", offload="off") as m:
        tokens = _tokens(40, m.n_vocab)
        ref = [m.next_token_logits(tokens[: i + 1]) for i in range(8, len(tokens))]
    on = {"cache_type": "f32", "offload": "on", "offload_tier": "disk", "prefetch": True}
    with Model(path, expert_budget=0.3, **on) as m:
        m.next_token_logits(tokens[:2])
        failures = 0
        for k, i in enumerate(range(8, len(tokens))):
            if k % 5 == 0:
                _core.io_fault("eio", 3, 1)  # some read of this step (foreground or background) fails
            try:
                got = m.next_token_logits(tokens[: i + 1])
            except RuntimeError as e:
                assert "computed from the model file instead" in str(e)
                failures += 1
                _core.io_fault_clear()
                got = m.next_token_logits(tokens[: i + 1])
            np.testing.assert_array_equal(got, ref[k])
        assert failures > 0
        assert m.offload_stats()["prefetch_loads"] > 0
