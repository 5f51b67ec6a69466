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


def test_ray_datas_info_lines_stay_in_its_log_file_unless_verbose(monkeypatch):
    import ray.data  # noqa: F401 (sets up Ray Data's loggers)

    from pipeline.runtime.ray_logging import quiet_ray_data_console

    console = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.StreamHandler)]
    files = [h for h in logging.getLogger("ray.data").handlers if not isinstance(h, logging.StreamHandler)]
    progress = logging.getLogger("ray.data._internal.progress")
    before = [h.level for h in console], progress.level
    assert console and files
    try:
        monkeypatch.setenv("PIPELINE_VERBOSE", "1")
        quiet_ray_data_console()
        assert [h.level for h in console] == before[0] and progress.level == before[1]
        monkeypatch.delenv("PIPELINE_VERBOSE")
        quiet_ray_data_console()
        assert {h.level for h in console} == {logging.WARNING} and progress.level == logging.ERROR
        assert all(h.level <= logging.INFO for h in files)  # the session's file keeps the INFO lines
    finally:
        for handler, level in zip(console, before[0]):
            handler.setLevel(level)
        progress.setLevel(before[1])
