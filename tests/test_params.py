from pathlib import Path

import pytest
import yaml

from pipeline.compose import CONF_DIR, compose, render
from pipeline.config.params import BUILT_IN_FORMATS, ConfigError, load_params, parse_params

ROOT = Path(__file__).resolve().parent.parent


def test_committed_params_are_the_composed_defaults():
    """params.yaml is generated from conf/; a hand edit that drifted would show here."""
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert yaml.safe_load(render(compose([]), [])) == committed


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"studnet"):
        parse_params({"studnet": {"lr": 0.1}})
    with pytest.raises(ConfigError, match=r"student\.lrr"):
        parse_params({"student": {"lrr": 0.1}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"teacher\.epochs"):
        parse_params({"teacher": {"epochs": "ten"}})


@pytest.mark.parametrize("raw, key", [
    ({"data": {"labeled_fraction": 0.0}}, "data.labeled_fraction"),
    ({"data": {"labeled_fraction": 1.5}}, "data.labeled_fraction"),
    ({"decoder_pretrain": {"sigma": -0.1}}, "decoder_pretrain.sigma"),
    ({"decoder_pretrain": {"mode": "ddpe"}}, "decoder_pretrain.mode"),
    ({"decoder_pretrain": {"sigma": 0.3, "sigma_max": 0.2}}, "decoder_pretrain.sigma_max"),
    ({"decoder_pretrain": {"target": "clean"}}, "decoder_pretrain.target"),
    ({"encoder": {"init": "imagenet"}}, "encoder.init"),
    ({"data": {"format": "folder", "root": "/data/x", "tuning": True}}, "data.tuning"),
    ({"encoder": {"densecl": {"momentum": 1.0}}}, "encoder.densecl.momentum"),
    ({"study": {"fractions": [0.05, 2.0]}}, "study.fractions"),
    ({"study": {"seeds": []}}, "study.seeds"),
    ({"study": {"teacher_steps": [1000, 1000]}}, "study.teacher_steps"),
    ({"study": {"teacher_epochs": 3}}, "study.teacher_steps"),
    ({"study": {"sweep_fraction": 0.2}}, "study.sweep_fraction"),
    ({"study": {"pretrain_fractions": [0.3]}}, "study.pretrain_fractions"),
    ({"study": {"pretrain_epochs": [30, 0]}}, "study.pretrain_epochs"),
    ({"teacher": {"batch_size": 0}}, "teacher.batch_size"),
    ({"incremental": {"masks": {"seeds": -1}}}, "incremental.masks.seeds: expected a whole number of points, 0 for"),
    ({"ray": {"num_workers": 0}}, "ray.num_workers"),
    ({"ray": {"data_uri": "shards"}}, "ray.data_uri"),
    ({"model": {"preset": "resnet9000"}}, "model.preset"),
    ({"model": {"decoder_channels": [8, 8]}}, "model.decoder_channels"),
    ({"encoder": {"init": "file"}}, "encoder.weights_path"),
    ({"encoder": {"init": "timm"}}, (r"encoder.init: 'timm' loads a preset's published weights, and model.preset "
                                      r"'tiny' has none; presets that do: r50_vit_b16 \(vit_base_r50_s16_224.orig_in21k\)")),
    ({"study": {"ablation_rows": ["dsbn", "mixup"]}}, "study.ablation_rows"),
    ({"data": {"format": "folder"}}, "data.root"),
    ({"data": {"image_size": 100}}, "data.image_size"),
    ({"teacher": {"encoder_lr_scale": -1.0}}, "teacher.encoder_lr_scale"),
    ({"student": {"conf_threshold": 1.5}}, "student.conf_threshold"),
    ({"data": {"seed": -1}}, r"data.seed: expected a whole number in \[0, 2\*\*32\), got -1"),
    ({"data": {"seed": 2**32}}, r"data.seed: expected a whole number in \[0, 2\*\*32\), got 4294967296"),
    ({"data": {"image_size": 1048576}}, "data.image_size: expected at most 8192 px"),
])
def test_out_of_range_values_are_named(raw, key):
    with pytest.raises(ConfigError, match=key if "\\" in key else key.replace(".", r"\.")):
        parse_params(raw)


@pytest.mark.parametrize("text, message", [
    ("teacher:\n  lr: .inf\n", "teacher.lr: expected a finite number, got inf"),
    ("teacher:\n  lr: .nan\n", "teacher.lr: expected a finite number, got nan"),
    ("decoder_pretrain:\n  sigma_max: .inf\n", "decoder_pretrain.sigma_max: expected a finite number, got inf"),
    ("student:\n  pseudo_weight: .inf\n", "student.pseudo_weight: expected a finite number, got inf"),
    ("study:\n  sigmas: [0.1, .inf]\n", r"study.sigmas\[1\]: expected a finite number, got inf"),
    ("encoder:\n  densecl:\n    temperature: .inf\n", "encoder.densecl.temperature: expected a finite number"),
])
def test_a_non_finite_number_is_refused_anywhere(tmp_path, text, message):
    refused(tmp_path, text, message)


def refused(tmp_path, text: str, message: str) -> None:
    """A params file of `text` is refused with `message` (a regex), after the file's name."""
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{path}: {message}"):
        load_params(path)


def test_a_non_finite_override_is_refused(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("teacher:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"with teacher.lr=inf: teacher.lr: expected a finite number, got inf"):
        load_params(path, ["teacher.lr=inf"])


@pytest.mark.parametrize("text", ["", "\n", "# every value commented out\n# teacher:\n#   lr: 0.1\n"])
def test_an_empty_params_file_is_refused(tmp_path, text):
    refused(tmp_path, text, r"empty \(no params in it\); expected the params mapping")


@pytest.mark.parametrize("text, message", [
    ("teacher:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n", r"teacher.lr is written twice \(lines 2 and 4\)"),
    ("teacher:\n  lr: 0.1\nstudent:\n  lr: 0.1\nteacher:\n  epochs: 3\n", r"teacher is written twice \(lines 1 and 5\)"),
    ("encoder:\n  densecl:\n    momentum: 0.9\n    momentum: 0.99\n", r"encoder.densecl.momentum is written twice \(lines 3 and 4\)"),
    ("self_training:\n  rounds: {round1: teacher, round1: teacher}\n", r"self_training.rounds.round1 is written twice \(both on line 2\)"),
])
def test_a_key_written_twice_is_named(tmp_path, text, message):
    refused(tmp_path, text, f"{message}; expected each key once")


def test_yaml_merge_keys_and_aliases_are_not_duplicates(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("teacher: &base\n  lr: 0.1\n  epochs: 3\nstudent:\n  <<: *base\n  lr: 0.2\n")
    params = load_params(path)
    assert (params.teacher.lr, params.student.lr, params.student.epochs) == (0.1, 0.2, 3)
    assert yaml.safe_load(path.read_text())["student"]["lr"] == 0.2  # other readers (DVC) keep their loader


def test_the_committed_params_load():
    assert load_params(ROOT / "params.yaml").data.format == "shapes"


def test_load_params_names_the_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("student:\n  epochs: -1\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_params(bad)


def test_broken_yaml_names_the_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("student: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_overrides_change_one_value_and_are_validated(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("decoder_pretrain:\n  sigma: 0.2\n")
    params = load_params(path, ["decoder_pretrain.mode=dep", "decoder_pretrain.sigma=0.4", "teacher.epochs=3"])
    assert (params.decoder_pretrain.mode, params.decoder_pretrain.sigma, params.teacher.epochs) == ("dep", 0.4, 3)
    with pytest.raises(ConfigError, match=r"decoder_pretrain\.sigmaa.*no such params key"):
        load_params(path, ["decoder_pretrain.sigmaa=0.4"])
    with pytest.raises(ConfigError, match=r"decoder_pretrain\.sigma"):
        load_params(path, ["decoder_pretrain.sigma=-1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_params(path, ["decoder_pretrain.sigma"])


def test_presets_compose_and_validate():
    params = compose(["model=r50_vit_b16", "experiment=smoke"])
    assert params.model.preset == "r50_vit_b16"
    assert params.model.decoder_channels == [256, 128, 64, 16]
    assert params.data.digits.train_scenes == 60


PAPER_EXPERIMENTS = {"cityscapes_ddep": "cityscapes", "ade20k_ddep": "ade20k", "pascal_context_ddep": "pascal_context"}


@pytest.mark.parametrize("experiment", sorted(p.stem for p in CONF_DIR.glob("experiment/*.yaml")))
def test_every_experiment_preset_composes_and_validates(experiment):
    needed = ["data.root=/data/x"]
    params = compose([f"experiment={experiment}", *needed] if experiment in PAPER_EXPERIMENTS or experiment == "ddep_transunet"
                     else [f"experiment={experiment}"])
    if experiment in PAPER_EXPERIMENTS:
        assert params.data.format == PAPER_EXPERIMENTS[experiment]
        assert params.model.preset == "r50_vit_b16" and params.encoder.init == "timm"
        assert params.decoder_pretrain.mode == "ddep" and params.decoder_pretrain.sigma == 0.2
        assert params.ray.use_gpu and params.teacher.hflip and params.data.fit == "tiles"


@pytest.mark.parametrize("dataset", sorted(p.stem for p in CONF_DIR.glob("dataset/*.yaml")))
def test_every_dataset_preset_composes_and_names_what_it_needs(dataset):
    if dataset in BUILT_IN_FORMATS:
        assert compose([f"dataset={dataset}"]).data.format == dataset
        return
    with pytest.raises(ConfigError, match="data.root"):
        compose([f"dataset={dataset}"])
    assert compose([f"dataset={dataset}", "data.root=/data/x"]).data.format == dataset


def test_the_cpu_hybrid_preset_has_five_decoder_blocks_images_in_its_token_stride_and_timms_weights():
    params = compose(["model=vit_tiny_r_s16_p8"])
    assert (params.model.preset, params.encoder.init, params.data.image_size) == ("vit_tiny_r_s16_p8", "timm", 128)
    assert len(params.model.decoder_channels) == 5
    with pytest.raises(ConfigError, match=r"data.image_size: expected a multiple of 32 \(model.preset 'vit_tiny_r_s16_p8'"):
        compose(["model=vit_tiny_r_s16_p8", "data.image_size=80"])
    with pytest.raises(ConfigError, match=r"model.decoder_channels: expected 5 widths \(one per decoder block: model.preset "
                                          r"'vit_tiny_r_s16_p8' has its tokens at stride 32\), got \[64, 32, 16, 16\]"):
        compose(["model=vit_tiny_r_s16_p8", "model.decoder_channels=[64,32,16,16]"])


def test_a_paper_preset_takes_its_encoder_weights_from_timms_hub_or_a_downloaded_copy():
    params = compose(["experiment=cityscapes_ddep", "data.root=/data/x"])
    assert (params.encoder.init, params.encoder.weights_path, params.encoder.timm_name) == ("timm", None, None)
    assert params.encoder.release(params.model.preset) == "vit_base_r50_s16_224.orig_in21k"  # the preset's own
    other = compose(["experiment=cityscapes_ddep", "data.root=/data/x", "encoder.timm_name=vit_base_r50_s16_384.orig_in21k"])
    assert other.encoder.release(other.model.preset) == "vit_base_r50_s16_384.orig_in21k"
    copy = compose(["experiment=cityscapes_ddep", "data.root=/data/x", "encoder.weights_path=/w/r50.safetensors"])
    assert copy.encoder.weights_path == "/w/r50.safetensors"


def test_a_batch_smaller_than_the_worker_count_is_refused():
    with pytest.raises(ConfigError, match="teacher.batch_size: a global batch of 2 cannot give each of ray.num_workers=4"):
        parse_params({"teacher": {"batch_size": 2}, "ray": {"num_workers": 4}})
    four = {"batch_size": 4}
    params = {"encoder": four, "decoder_pretrain": four, "teacher": four, "student": {**four, "unlabeled_batch_size": 4},
              "incremental": {"steps": {"step1": {"after": "student", "classes": ["dots"]}}, "training": {"batch_size": 2}},
              "ray": {"num_workers": 4}}
    with pytest.raises(ConfigError, match="incremental.training.batch_size: a global batch of 2 cannot give each"):
        parse_params(params)


def test_env_overrides_ray_address(monkeypatch):
    params = parse_params({"ray": {"address": "ray://params:10001"}})
    monkeypatch.setenv("RAY_ADDRESS", "ray://env:10001")
    assert params.ray.resolved_address() == "ray://env:10001"


def test_each_stage_depends_only_on_its_sections():
    """`ray` and `mlflow` are read by all stages but must not invalidate DVC's cache."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        params = stage.get("params", [])
        assert "ray" not in params and "mlflow" not in params, name
    assert stages["student_train"]["do"]["params"] == ["student", "model"]
    assert "student" not in stages["evaluate"]["params"]
    # Adding a round must not rerun the rounds before it: no round depends on the rounds.
    assert all("self_training" not in stages[name]["do"]["params"] for name in ("pseudo_label", "student_train"))


def test_the_rounds_are_a_chain_each_learning_from_the_one_before():
    rounds = {"round1": "teacher", "round2": "round1", "round3": "round2"}
    config = parse_params({"self_training": {"rounds": rounds}}).self_training
    assert config.rounds == rounds and config.last == "round3"
    assert parse_params({}).self_training.rounds == {"round1": "teacher"}


@pytest.mark.parametrize("rounds", [{}, {"round2": "round1"}, {"round1": "teacher", "round2": "teacher"},
                                    {"round1": "teacher", "round3": "round2"}, {"round2": "round1", "round1": "teacher"}])
def test_rounds_that_do_not_chain_name_the_key(rounds):
    # Taken as written: DVC ranges over params.yaml's mapping, never over a merge with the default.
    with pytest.raises(ConfigError, match=r"self_training.rounds: expected round1: teacher, then round2: round1"):
        parse_params({"self_training": {"rounds": rounds}})


def test_incremental_steps_are_a_chain_of_new_classes_after_the_student():
    steps = {"step1": {"after": "student", "classes": ["stripes", "dots"]}, "step2": {"after": "step1", "classes": ["star"]}}
    params = parse_params({"incremental": {"steps": steps, "protocol": "overlap"}})
    assert [step.classes for step in params.incremental.steps.values()] == [["stripes", "dots"], ["star"]]
    assert parse_params({}).incremental.steps == {}  # off by default


@pytest.mark.parametrize("incremental, message", [
    ({"steps": {"step2": {"after": "round1", "classes": ["a"]}}},
     r"incremental.steps: expected steps named step1, step2, … in order"),
    ({"steps": {"step1": {"classes": ["a"]}}},
     (r"incremental.steps.step1.after: expected 'student' \(the pipeline's student: each step "
      r"learns after the model before it\), got ''")),
    ({"steps": {"step1": {"after": "round1", "classes": ["a"]}}},
     r"incremental.steps.step1.after: expected 'student' \(the pipeline's student"),
    ({"steps": {"step1": {"after": "student", "classes": ["a"]}, "step2": {"after": "student", "classes": ["b"]}}},
     r"incremental.steps.step2.after: expected 'step1' \(the step before it"),
    ({"steps": {"step1": {"after": "student", "classes": []}}},
     r"incremental.steps.step1.classes: expected at least one new class"),
    ({"steps": {"step1": {"after": "student", "classes": ["a"]}, "step2": {"after": "step1", "classes": ["a"]}}},
     r"incremental.steps.step2.classes: 'a' is already new in step1"),
    ({"protocol": "mixed"}, r"incremental.protocol: expected one of disjoint, overlap, got 'mixed'"),
    ({"steps": {"step1": {"classes": ["a"], "tags": "t.csv"}}}, r"incremental.steps.step1.tags: Key 'tags' not in"),
])
def test_incremental_steps_that_cannot_be_used_name_the_key(incremental, message):
    with pytest.raises(ConfigError, match=message):
        parse_params({"incremental": incremental})


def test_the_stand_in_encoder_is_found_per_preset_or_named_as_missing(tmp_path):
    from pipeline.config.params import STANDIN_ENCODERS, standin_encoder

    (tmp_path / STANDIN_ENCODERS).mkdir(parents=True)
    (tmp_path / STANDIN_ENCODERS / "tiny.pt").write_bytes(b"weights")
    assert standin_encoder("tiny", tmp_path) == tmp_path / STANDIN_ENCODERS / "tiny.pt"
    with pytest.raises(ConfigError, match=r"encoder.init: 'supervised' starts from the stand-in encoder "
                                          r"encoders/weights/r50_vit_b16.pt, which does not exist"):
        standin_encoder("r50_vit_b16", tmp_path)
    assert (ROOT / STANDIN_ENCODERS / "tiny.pt").is_file()  # shipped with the project
