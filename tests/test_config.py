import pytest
import yaml

from qkd.config import RunConfig, config_dir, list_presets, load_config, with_overrides
from qkd.errors import QKDError


def test_builtin_default_matches_digits_preset():
    assert load_config(None) == load_config("digits")


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_validates(preset):
    cfg = load_config(preset)
    assert cfg.quant.weight_bits in (2, 3, 4)


def test_presets_cover_the_issue():
    names = set(list_presets())
    for b in (4, 3, 2):
        assert f"cifar10-resnet20-w{b}a{b}" in names
        assert load_config(f"cifar10-resnet20-w{b}a{b}").teacher.name == "resnet56"
    assert {"cifar100-resnet20-w4a4", "imagenet-resnet18-w4a4", "imagenet-mobilenetv2-w4a4"} <= names


def test_overrides_are_typed_and_nested():
    cfg = load_config("digits", ["quant.weight_bits=3", "optim.lr=0.5", "data.mean=[0.1]", "quant.act_bits=float"])
    assert cfg.quant.weight_bits == 3 and cfg.optim.lr == 0.5 and cfg.data.mean == [0.1]
    assert cfg.quant.act_bits is None


def test_with_overrides_copies_and_validates():
    cfg = load_config("digits")
    tuned = with_overrides(cfg, ["distill.temperature=4", "quant.step_init=lsq"])
    assert tuned.distill.temperature == 4 and tuned.quant.step_init == "lsq"
    assert cfg.distill.temperature == 2 and cfg.quant.step_init == "mse"  # the original is untouched
    with pytest.raises(QKDError, match="unknown step_init 'max'"):
        with_overrides(cfg, ["quant.step_init=max"])


def test_yaml_file_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": "qat", "epochs": 3}))
    cfg = load_config(str(path))
    assert cfg.method == "qat" and cfg.epochs == 3


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["quant.weight_bits=9"], "quant: bits must be an integer from 2 to 8"),
        (["quant.act_bits=1"], "bits must be an integer from 2 to 8"),
        (["optim.lrr=0.1"], "optim.lrr: unknown key"),
        (["quant.wbits=2"], "quant.wbits: unknown key"),
        (["quant.bn_batches=-1"], "bn_batches must be a non-negative integer"),
        (["method=foo"], "method"),
        (["epochs=0"], "epochs"),
        (["nonsense"], "must look like key=value"),
        (["split=[0,0,0]"], "split"),
        (["split=[0.5,0.5,0.5]"], "sum to 1, e.g. [0.15, 0.5, 0.35]; these sum to 1.5"),
        (["data.val_size=1.5"], "data.val_size must be a fraction below 1 (e.g. 0.1) or a whole number"),
        (["data.val_size=0"], "data.val_size must be a fraction below 1"),
    ],
)
def test_bad_config_gives_one_clear_line(overrides, needle):
    with pytest.raises(QKDError) as e:
        load_config(None, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_setting_without_its_equals_sign_is_named_as_a_setting():
    """``qkd run epochs 5`` reads "epochs" as a config; it said "config 'epochs' not found"."""
    for setting in ("epochs", "quant.weight_bits"):
        with pytest.raises(QKDError, match=f"^'{setting}' is a setting, not a config: settings are key=value"):
            load_config(setting, ["5"] if setting == "epochs" else [])


def test_val_size_counts_and_fractions_still_read():
    assert load_config(None, ["data.val_size=200"]).data.val_size == 200
    assert load_config(None, ["data.val_size=0.25"]).data.val_size == 0.25
    assert load_config(None, ["split=[0.2, 0.3, 0.5]"]).split == (0.2, 0.3, 0.5)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(QKDError, match="not found; give a YAML path or a preset: .*digits"):
        load_config("no-such-preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(QKDError, match="not valid YAML"):
        load_config(str(bad))


def test_config_dir_is_the_repo_configs():
    assert (config_dir() / "digits.yaml").is_file()
    assert RunConfig().data.name == "digits"


def test_where_settings_are_marked_once_on_the_fields():
    from qkd.config import where_settings
    from qkd.pipeline import EVAL_CHANGES
    from qkd.train.rundir import may_change_on_resume

    assert set(where_settings()) == {"name", "device", "runtime.kernels", "runtime.tensorboard", "data.root",
                                     "data.num_workers", "data.eval_batch_size", "data.download", "data.decode",
                                     "teacher.checkpoint", "student.checkpoint"}  # fmt: skip
    assert where_settings("data") == tuple(k for k in where_settings() if k.startswith("data."))
    assert all(may_change_on_resume(k) for k in where_settings()) and set(where_settings()) <= set(EVAL_CHANGES)
    assert not may_change_on_resume("data.batch_size") and not may_change_on_resume("quant.weight_bits")


def test_integer_zero_point_reaches_the_quantizers():
    """``qkd run cifar10-resnet20-w2a2 quant.integer_zero_point=true``: the option is read from the command line's
    overrides and every quantizer the config builds has it; off by default; refused for lsq."""
    from qkd.models import create_model
    from qkd.quant import quantize_model, quantizers

    assert load_config("cifar10-resnet20-w2a2").quant.integer_zero_point is False
    cfg = load_config("cifar10-resnet20-w2a2", ["quant.integer_zero_point=true"])
    assert cfg.quant.integer_zero_point is True and cfg.quant.method == "interval"
    model = quantize_model(create_model("tiny_cnn", width=4), cfg.quant)
    assert all(q.integer_zero_point for _, q in quantizers(model))
    with pytest.raises(QKDError, match="integer_zero_point applies to method interval"):
        load_config("digits", ["quant.method=lsq", "quant.integer_zero_point=true"])
