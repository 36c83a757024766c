import pytest

from configurator import ConfigError, configure, parse_args

DEFAULTS = {"epochs": 300, "lr": 1.5e-3, "compile": False, "out_dir": "out", "betas": (0.9, 0.98),
            "teacher_cfg": {}, "max_norm": None, "model": "base"}


def test_overrides_and_int_to_float():
    changes = parse_args(["--epochs=3", "--lr=1", "--out_dir=/tmp/x y", "--betas=(0.9, 0.95)", "--max_norm=3.0",
                          "--teacher_cfg={'layers': 2}"], DEFAULTS)
    assert changes == {"epochs": 3, "lr": 1.0, "out_dir": "/tmp/x y", "betas": (0.9, 0.95), "max_norm": 3.0,
                       "teacher_cfg": {"layers": 2}}
    assert type(changes["lr"]) is float


def test_space_separated_values_and_bare_flags():
    assert parse_args(["--epochs", "5", "--compile"], DEFAULTS) == {"epochs": 5, "compile": True}
    assert parse_args(["--compile", "False", "--model", "large"], DEFAULTS) == {"compile": False, "model": "large"}
    with pytest.raises(ConfigError, match=r"--epochs=VALUE"):
        parse_args(["--epochs"], DEFAULTS)


def test_unknown_key_names_the_closest_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown setting 'epoch'.*did you mean epochs"):
        parse_args(["--epoch=3"], DEFAULTS)
    with pytest.raises(ConfigError, match=r"'xyzzy'.*valid keys"):
        parse_args(["--xyzzy=3"], DEFAULTS)


def test_type_mismatch_names_key_type_and_value():
    with pytest.raises(ConfigError, match=r"epochs: expected int.*str 'abc'"):
        parse_args(["--epochs=abc"], DEFAULTS)
    with pytest.raises(ConfigError, match=r"epochs: expected int.*float 2.5"):
        parse_args(["--epochs=2.5"], DEFAULTS)
    with pytest.raises(ConfigError, match=r"compile: expected bool"):
        parse_args(["--compile=3"], DEFAULTS)
    with pytest.raises(ConfigError, match=r"model: expected str"):
        parse_args(["--model=3"], DEFAULTS)


def test_config_files_then_overrides(tmp_path):
    cfg = tmp_path / "run.py"
    cfg.write_text("epochs = 10\nlr = 2\nimport math\n_scratch = 1\n")
    assert parse_args([str(cfg), "--epochs=4"], DEFAULTS) == {"epochs": 4, "lr": 2.0}
    bad = tmp_path / "bad.py"
    bad.write_text("epoks = 10\n")
    with pytest.raises(ConfigError, match=r"'epoks' in config file .*bad.py.*did you mean epochs"):
        parse_args([str(bad)], DEFAULTS)
    with pytest.raises(ConfigError, match=r"missing.py' does not exist"):
        parse_args([str(tmp_path / "missing.py")], DEFAULTS)


def test_configure_updates_globals_and_exits_cleanly_on_error(capsys):
    namespace = {"epochs": 1, "lr": 0.1, "SOME_CONSTANT": 3, "__name__": "x"}
    config = configure(namespace, ["--epochs=7"])
    assert namespace["epochs"] == 7 and config == {"epochs": 7, "lr": 0.1}
    assert "epochs" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="config error: unknown setting 'SOME_CONSTANT'"):
        configure(namespace, ["--SOME_CONSTANT=4"])


def test_every_config_file_fits_its_script():
    """Each config/<stage>_*.py sets only settings its script declares, with the right types."""
    import glob
    import importlib
    import os

    from configurator import settings_of
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    scripts = {"pretrain": "pretrain", "finetune": "finetune", "segment": "segment", "transfer": "eval_transfer"}
    files = sorted(glob.glob(os.path.join(root, "config", "*.py")))
    assert any("pretrain_demo" in f for f in files)
    for path in files:
        stage = os.path.basename(path).split("_")[0]
        assert stage in scripts, f"{path}: config files are named <stage>_<name>.py, stage one of {list(scripts)}"
        module = importlib.import_module(scripts[stage])  # eval_transfer.py also takes finetune.py's settings:
        defaults = {**settings_of(vars(module)), **getattr(module, "FINETUNE_DEFAULTS", {})}
        assert parse_args([path], defaults), f"{path} changes nothing"
