"""Shared fixtures. Tiers: tests/unit (CPU, seconds), tests/ray (one local Ray per module),
tests/integration (a few real steps end to end)."""

from __future__ import annotations

import os

import pytest
import torch

from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.presets import get_preset

# Tiny models gain nothing from intra-op threads, and several test processes may share
# the 2 cores; one thread avoids OpenMP oversubscription stalls.
torch.set_num_threads(1)

# Ray Train's controller takes each worker's `ray.train.report` at its next health-check poll,
# every 2 s by default: a tiny-model step takes a fraction of that, so most of a TorchTrainer
# run's steps and its end would be spent waiting for polls (measured: ~1.2 s per step, ~3.5 s
# per run). Every Ray the tests start inherits this (local ray.init, `ray start` heads and
# their jobs copy os.environ). A slow poll is not a failure (only one hanging for 10 min is).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Two of Ray's defaults sized for cloud clusters, each a Python process of its own (Ray and its
# libraries imported) that the tests' single node with a few small local files gains nothing
# from. A suite run with every process's CPU summed (2 cores): 45 footer-reader actors took
# 104 CPU-s and the per-run preemption watchers (node drains; no test drains a node) 45 CPU-s,
# of 2,807.
# - Ray Data's Parquet reader starts up to 32 footer-reading actors per read (network-bound
#   reads of remote footers); the tests read a handful of local files.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
# - Ray Train starts a PreemptionWatcher actor per TorchTrainer run to follow node drains.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


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
