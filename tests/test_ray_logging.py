import logging
import os

import ray

from pipeline.runtime.ray_logging import quiet_worker_logs

# Ray Train names the logger of its per-epoch "Reporting training result" line after its file.
REPORTER = logging.getLogger(os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution",
                                          "context.py"))


def test_the_report_line_of_each_epoch_is_kept_only_when_verbose(monkeypatch):
    before = REPORTER.level
    try:
        REPORTER.setLevel(logging.NOTSET)
        monkeypatch.setenv("PIPELINE_VERBOSE", "1")
        quiet_worker_logs()
        assert REPORTER.level == logging.NOTSET  # left to Ray Train's INFO
        monkeypatch.delenv("PIPELINE_VERBOSE")
        quiet_worker_logs()
        assert REPORTER.level == logging.WARNING
    finally:
        REPORTER.setLevel(before)
