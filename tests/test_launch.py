from pipeline.config.params import RayConfig
from pipeline.runtime.ray_logging import VERBOSE
from pipeline.train.launch import job_configs


def test_ray_trains_console_lines_are_warnings_only_unless_verbose(monkeypatch):
    monkeypatch.delenv(VERBOSE, raising=False)
    assert job_configs(RayConfig(), "job", "/tmp/runs")["run_config"].logging_config.log_level == "WARNING"
    monkeypatch.setenv(VERBOSE, "1")
    assert job_configs(RayConfig(), "job", "/tmp/runs")["run_config"].logging_config.log_level == "INFO"


def test_a_relaunch_resumes_the_run_of_the_same_settings_and_inputs_and_no_other(tmp_path):
    """The Ray Train run a training stage resumes is the one its name picks: the same for the
    same stage, section, model and inputs whatever the runtime wiring; another for any change
    (the end-to-end tests interrupt a stage and see it resume under this name)."""
    import os

    from pipeline.config.params import ModelConfig, TeacherConfig
    from pipeline.train.launch import run_name
    from pipeline.train.loop import JobConfig

    shard = tmp_path / "prepared" / "labeled" / "part-00000.parquet"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"rows")
    weights = tmp_path / "pretrained.pt"
    weights.write_bytes(b"weights")
    inputs = [tmp_path / "prepared", weights]

    def name(stage="teacher_finetune", inputs=inputs, **changed) -> str:
        return run_name(stage, JobConfig(train=TeacherConfig(**changed), model=ModelConfig(), num_classes=3).identity(),
                        inputs)

    wired = JobConfig(train=TeacherConfig(), model=ModelConfig(), num_classes=3, cpus_per_worker=2,
                      init_state={"w": 1}, epoch_log_uri="file:///elsewhere/epochs")
    assert name() == run_name("teacher_finetune", wired.identity(), inputs)
    assert len({name(), name(lr=0.01), name(seed=1), name(stage="student_train"), name(inputs=inputs[:1])}) == 5
    first = name()
    os.utime(shard, ns=(1, 1))  # the prepared data rewritten
    second = name()
    weights.write_bytes(b"other weights")  # another pretrained decoder
    assert len({first, second, name()}) == 3
