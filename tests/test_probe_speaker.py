"""scripts/probe_speaker.py: the nearest-class-mean probe on cases with known answers."""

from __future__ import annotations

import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "probe_speaker", os.path.join(ROOT, "scripts", "probe_speaker.py")
)
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def test_retrieval_finds_a_linear_map_and_not_noise():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(120, 8))
    mixing = rng.normal(size=(8, 12))
    source = target @ mixing + 0.05 * rng.normal(size=(120, 12))
    assert probe.retrieval_accuracy(source, target) > 0.95
    assert probe.retrieval_accuracy(target, target) == 1.0
    # Unrelated vectors: about chance (1/60).
    assert probe.retrieval_accuracy(rng.normal(size=(120, 12)), target) < 0.1


def test_detail_is_zero_for_flat_and_grows_with_ripple():
    flat = np.ones((10, 8))
    assert probe.detail(flat) == (0.0, 0.0)
    ripple = np.tile([0.0, 1.0], (10, 4))  # Alternating across frequency only.
    assert probe.detail(ripple) == (1.0, 0.0)
