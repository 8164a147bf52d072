"""Shared fixtures. Tiers: tests/unit (CPU, seconds), tests/ray (one local Ray per module),
tests/integration (a few real steps end to end)."""

from __future__ import annotations

import pytest
import torch

from unimoe_ray.config import get_preset
from unimoe_ray.model.unimoe_audio import UniMoEAudio


# Tiny models gain nothing from intra-op threads, and several test processes may share
# the 2 cores; one thread avoids OpenMP oversubscription stalls.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_cfg():
    return get_preset("tiny")


@pytest.fixture
def tiny_model(tiny_cfg):
    return UniMoEAudio(tiny_cfg).init_weights(seed=0).eval()
