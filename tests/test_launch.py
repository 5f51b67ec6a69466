from pipeline.config.params import RayConfig
from pipeline.runtime.ray_logging import VERBOSE
from pipeline.train.launch import job_configs


def test_ray_trains_console_lines_are_warnings_only_unless_verbose(monkeypatch):
    monkeypatch.delenv(VERBOSE, raising=False)
    assert job_configs(RayConfig(), "job")["run_config"].logging_config.log_level == "WARNING"
    monkeypatch.setenv(VERBOSE, "1")
    assert job_configs(RayConfig(), "job")["run_config"].logging_config.log_level == "INFO"
