"""Every config file loads; typos, wrong types and out-of-range values fail naming the key."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, ConfigError, dump, load_config, parse_overrides
from pipeline.formula import eval_formula

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((ROOT / "configs").glob("*.yaml")) + [ROOT / "params.yaml"]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    assert isinstance(load_config(path), Config)


def test_params_yaml_is_the_defaults():
    # params.yaml is what DVC tracks; presets list only changes against these defaults.
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == yaml.safe_load(dump(Config()))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_list_only_what_they_change(path):
    defaults = Config().model_dump(mode="json")
    for section, values in yaml.safe_load(path.read_text()).items():
        # a preset's backbones replace the default's whole mapping (each entry says what it trains), not key by key
        if isinstance(values, dict) and section not in ("space", "backbones"):
            for key, value in values.items():
                assert defaults[section][key] != value, f"{path.name}: {section}.{key} repeats the default"


@pytest.mark.parametrize(("override", "named"), [
    ("train.lrr=0.1", "train.lrr"),
    ("trian.lr=0.1", "trian"),
    ("data.image_size=0", "data.image_size"),
    ("train.lr=-1", "train.lr"),
    ("folds.n_splits=1", "folds.n_splits"),
    ("train.epochs=many", "train.epochs"),
    ("data.channels=2", "data.channels"),
    ("data.source=folder", "data.dir"),
    ("backbones=[]", "backbones"),
    ("data.compose=mask*", "data.compose"),
    ("train.patience=3", "train.keep_epoch: best"),  # early stopping needs a best epoch to wait for
    ("train.keep_epoch=first", "train.keep_epoch"),
])
def test_bad_values_name_their_key(override, named):
    with pytest.raises(ConfigError) as error:
        load_config(ROOT / "params.yaml", [override])
    assert named in str(error.value)


def test_typo_suggests_the_close_key():
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        load_config(None, ["train.lrr=0.1"])


def test_overrides_are_yaml():
    assert parse_overrides(["backbones=[a,b]", "infer.tta=[]", "data.group_col=null", "train.lr=0.001"]) == {
        "backbones": ["a", "b"], "infer": {"tta": []}, "data": {"group_col": None}, "train": {"lr": 0.001}}
    config = load_config(None, ["data.image_size=[48, 64]", "train.lr=0.01"])
    assert config.data.size_hw == (48, 64) and config.train.lr == 0.01


def test_cli_exits_with_the_key_and_no_traceback(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "pipeline.folds", "--config", str(ROOT / "params.yaml"),
                             "folds.n_splitz=3", f"paths.work_dir={tmp_path}"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "folds.n_splitz" in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_compose_formula():
    assert eval_formula("mask*6 + gender*3 + age", {"mask": 2, "gender": 1, "age": 2}) == 17
    with pytest.raises(ValueError):
        eval_formula("__import__('os')", {})


def test_backbones_list_or_mapping_with_own_train_overrides():
    as_list = load_config(None, ["backbones=[lcnet_050,resnet10t]"])
    assert as_list.backbones == {"lcnet_050": {}, "resnet10t": {}}
    config = load_config(None, ["backbones={lcnet_050: {lr: 0.01, epochs: 3}, resnet10t: {}}"])
    own = config.for_backbone("lcnet_050")
    assert (own.train.lr, own.train.epochs) == (0.01, 3)
    assert config.for_backbone("resnet10t").train.lr == config.train.lr
    with pytest.raises(ConfigError, match="backbones.lcnet_050 sets unknown train key"):
        load_config(None, ["backbones={lcnet_050: {lrr: 0.01}}"])
    with pytest.raises(ConfigError, match="backbones.lcnet_050.lr"):
        load_config(None, ["backbones={lcnet_050: {lr: -1}}"])


def test_a_backbone_name_with_a_dot_gets_a_dvc_safe_key_and_keeps_its_timm_name():
    # DVC reads `backbones.convnext_tiny.fb_in22k` as nested keys, so the per-backbone stages could not find it.
    from pipeline.training.fold_setup import timm_name

    config = load_config(None, ["backbones={convnext_tiny.fb_in22k: {lr: 0.001}, lcnet_050: {}}"])
    assert config.backbones == {"convnext_tiny_fb_in22k": {"model": "convnext_tiny.fb_in22k", "lr": 0.001},
                                "lcnet_050": {}}
    assert timm_name(config.for_backbone("convnext_tiny_fb_in22k"), "convnext_tiny_fb_in22k") == \
        "convnext_tiny.fb_in22k"
    assert timm_name(config.for_backbone("lcnet_050"), "lcnet_050") == "lcnet_050"
    assert timm_name(config, "convnext_tiny_fb_in22k") == "convnext_tiny.fb_in22k"  # the whole config knows it too
    # Written out and read back (params.yaml), the names stay put.
    assert load_config(None, [f"backbones={dict(config.backbones)}"]).backbones == config.backbones


def test_config_write_turns_a_preset_into_params_yaml(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "params.yaml"
    result = subprocess.run([sys.executable, "-m", "pipeline.config", "--config", str(ROOT / "configs" / "gpu.yaml"),
                             "--write", str(target), "train.epochs=2"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    written = load_config(target)
    assert written.train.epochs == 2 and written.data.image_size == 256 and written.train.pretrained
    assert list(written.backbones) == ["convnext_tiny_fb_in22k", "efficientnet_b2_ra_in1k", "resnet50_a1_in1k"]
    assert yaml.safe_load(target.read_text()) == yaml.safe_load(dump(written))
    bad = subprocess.run([sys.executable, "-m", "pipeline.config", "--config", str(ROOT / "configs" / "gpu.yaml"),
                          "--write", str(target), "train.epochz=2"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "train.epochz" in bad.stderr and "Traceback" not in bad.stderr
    assert load_config(target).train.epochs == 2  # a refused config leaves the file as it was


def test_off_and_on_are_words_not_booleans(tmp_path):
    # PyYAML's YAML 1.1 reads `off` as False, which `runtime.amp` refused as "got False".
    assert load_config(None, ["runtime.amp=off"]).runtime.amp == "off"
    preset = tmp_path / "preset.yaml"
    preset.write_text("runtime:\n  amp: off\ntrain:\n  ema: true\n")
    config = load_config(preset)
    assert config.runtime.amp == "off" and config.train.ema is True


def test_a_misspelt_choice_fails_the_config_check_naming_the_override():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["train.loss=focall", "metric=f1"])
    message = str(error.value)
    assert "command-line override 'train.loss'" in message and "(got 'focall')" in message
    assert "command-line override 'metric'" in message and "'macro_f1'" in message


def test_a_bad_value_in_the_file_is_not_blamed_on_the_command_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {augment: flipz}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, ["train.lr=0.01"])
    assert f"invalid config {path}" in str(error.value) and "command-line" not in str(error.value)
    assert "'train.augment'" in str(error.value)


def test_the_config_choices_are_the_names_the_training_tables_build():
    from pipeline.config import sections
    from pipeline.training.augment import PRESETS
    from pipeline.training.losses import LOSSES

    assert set(sections.LOSS_NAMES) == set(LOSSES) and set(sections.AUGMENT_PRESETS) == set(PRESETS)
