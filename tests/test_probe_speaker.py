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


def test_separable_speakers_are_told_apart_and_shuffled_ones_are_not():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 3
    labels = [f"s{i % 5}" for i in range(200)]
    vectors = np.stack([centres[i % 5] + rng.normal(size=16) for i in range(200)])
    assert probe.nearest_mean_accuracy(vectors, labels) == 1.0
    # One vector for everyone but noise: about chance (0.2).
    noise = rng.normal(size=(200, 16))
    assert probe.nearest_mean_accuracy(noise, labels) < 0.4
    # A constant offset and scale per dimension change nothing (standardised).
    scaled = vectors * np.linspace(1, 100, 16) + 5
    assert probe.nearest_mean_accuracy(scaled, labels) == 1.0
