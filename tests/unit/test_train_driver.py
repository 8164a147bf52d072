"""The training driver's Ray Train settings: the controller's poll interval, which paces
`ray.train.report` (a worker's result queue holds one report until the controller polls)."""

from __future__ import annotations

from ray.train.v2._internal import constants as train_constants

from unimoe_ray.train import run


def test_report_poll_defaults_short_and_keeps_the_users_choice(monkeypatch):
    monkeypatch.delenv(run.REPORT_POLL_ENV, raising=False)
    assert run.set_report_poll() == run.REPORT_POLL_S
    assert float(run.REPORT_POLL_S) < train_constants.DEFAULT_HEALTH_CHECK_INTERVAL_S
    monkeypatch.setenv(run.REPORT_POLL_ENV, "3.5")
    assert run.set_report_poll() == "3.5"


def test_ray_passes_the_poll_interval_from_the_driver_to_the_controller():
    # Set on the driver, it reaches the controller only if Ray Train still propagates it (and
    # under this name): a Ray upgrade that changes either must fail here, not slow training.
    assert run.REPORT_POLL_ENV == train_constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR
    assert run.REPORT_POLL_ENV in train_constants.ENV_VARS_TO_PROPAGATE
