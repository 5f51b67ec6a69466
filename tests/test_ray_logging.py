import logging

import pytest

from pipeline.runtime.ray_logging import VERBOSE, quiet_worker_logs

REPORT_LOGGERS = ("ray.train.v2._internal.execution.storage", "ray.train.v2._internal.execution.context")


@pytest.fixture(autouse=True)
def levels_restored():
    loggers = [logging.getLogger(name) for name in REPORT_LOGGERS]
    before = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, before):
        logger.setLevel(level)


def test_ray_trains_line_per_checkpoint_and_report_is_kept_only_when_verbose(monkeypatch):
    for name in REPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    monkeypatch.setenv(VERBOSE, "1")
    quiet_worker_logs()
    assert all(logging.getLogger(name).isEnabledFor(logging.INFO) for name in REPORT_LOGGERS)
    monkeypatch.delenv(VERBOSE)
    quiet_worker_logs()
    assert not any(logging.getLogger(name).isEnabledFor(logging.INFO) for name in REPORT_LOGGERS)
    assert all(logging.getLogger(name).isEnabledFor(logging.WARNING) for name in REPORT_LOGGERS)
