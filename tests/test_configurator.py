import re

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
    assert namespace["epochs"] == 7 and vars(config) == {"epochs": 7, "lr": 0.1} and config.given == {"epochs"}
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
        assert parse_args([path], defaults, module.RULES), f"{path} changes nothing"


# ------------------------------------------------------------------------- typed values, rules, --help
def test_none_is_refused_for_a_typed_default_and_taken_where_the_default_is_none():
    for arg in ("--epochs=None", "--model=None", "--betas=None"):
        with pytest.raises(ConfigError, match=rf"{arg[2:].split('=')[0]}: expected .* got None"):
            parse_args([arg], DEFAULTS)
    assert parse_args(["--max_norm=None"], DEFAULTS) == {"max_norm": None}


def test_tuples_keep_their_length_and_element_types_lists_any_length():
    with pytest.raises(ConfigError, match=r"betas: expected 2 values.*got 1: \(0.9,\)"):
        parse_args(["--betas=(0.9,)"], DEFAULTS)
    with pytest.raises(ConfigError, match=r"betas\[1\]: expected float.*str 'x'"):
        parse_args(["--betas=(0.9, 'x')"], DEFAULTS)
    assert parse_args(["--betas=[1, 0.5]"], DEFAULTS) == {"betas": (1.0, 0.5)}  # ints become floats here too
    defaults = {"out_indices": [], "tokens": [196, 98]}
    assert parse_args(["--out_indices=[3, 5, 7, 11]", "--tokens=(16, 8, 3)"], defaults) == \
        {"out_indices": [3, 5, 7, 11], "tokens": [16, 8, 3]}


def test_non_finite_floats_are_refused():
    for text in ("1e999", "-1e999"):
        with pytest.raises(ConfigError, match=r"lr: -?inf from --lr=.* not a finite number"):
            parse_args([f"--lr={text}"], DEFAULTS)
    with pytest.raises(ConfigError, match=r"betas\[0\]: inf"):
        parse_args(["--betas=(1e999, 0.9)"], DEFAULTS)


def test_rules_refuse_values_outside_choices_and_ranges_from_files_and_flags(tmp_path):
    from configurator import Range, at_least
    rules = {"model": ("tiny", "base"), "epochs": at_least(1), "lr": Range(0, 1)}
    with pytest.raises(ConfigError, match=r"model='huge' .* must be one of 'tiny', 'base'"):
        parse_args(["--model=huge"], DEFAULTS, rules)
    with pytest.raises(ConfigError, match=r"epochs=0 .* must be at least 1"):
        parse_args(["--epochs=0"], DEFAULTS, rules)
    cfg = tmp_path / "run.py"
    cfg.write_text("lr = 2\n")
    with pytest.raises(ConfigError, match=r"lr=2.0 from config file .*run.py is not allowed: lr must be between 0 and 1"):
        parse_args([str(cfg)], DEFAULTS, rules)
    assert parse_args(["--model=tiny", "--epochs=1", "--lr=1"], DEFAULTS, rules) == \
        {"model": "tiny", "epochs": 1, "lr": 1.0}


SCRIPTS = ("pretrain", "finetune", "segment", "eval_transfer", "bench", "show_morph")


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_every_setting_with_its_default_and_source_comment(name, capsys):
    """Compared with a plain regex reading of the source (eval_transfer.py takes finetune.py's settings)."""
    import importlib
    import os
    import re

    from configurator import settings_of
    module = importlib.import_module(name)
    comments = {}
    for source in ("finetune", name) if name == "eval_transfer" else (name,):
        with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), f"{source}.py")) as f:
            comments.update(re.findall(r"^(\w+) = .*?  # (.*)$", f.read(), flags=re.M))
    namespace = {**vars(module), **getattr(module, "FINETUNE_DEFAULTS", {})}  # eval_transfer: finetune.py's too
    with pytest.raises(SystemExit) as e:
        configure(namespace, ["--epochs=None", "--help"], getattr(module, "RULES", None))
    assert e.value.code == 0  # --help wins over everything else on the line
    lines = capsys.readouterr().out.splitlines()
    settings = settings_of(namespace)
    assert len(settings) >= 10 and lines[0] == f"usage: python {name}.py [config_file.py ...] [--key=value ...]"
    for key, default in settings.items():
        line = next((l for l in lines if l.startswith(f"  --{key}=")), None)
        assert line is not None, f"{name}.py --help lacks {key}"
        assert line.startswith(f"  --{key}={default!r}")
        if key in comments:
            assert comments[key] in line
    if name == "pretrain":
        assert "  --model='base'  tiny, small, base, large [one of 'tiny', 'small', 'base', 'large']" in lines
        assert "  # masking (BEiT block-wise)" in lines


def test_help_from_the_command_line():
    from conftest import run_script
    proc = run_script(["segment.py", "-h"], timeout=120)
    assert "  --crop_size=512  training crop = backbone input = sliding window at evaluation [at least 1]" in \
        proc.stdout.splitlines()


def test_every_script_passes_its_rules_and_every_default_obeys_them():
    import importlib
    import os
    for name in SCRIPTS:
        module = importlib.import_module(name)
        rules = getattr(module, "RULES", {})
        assert name == "show_morph" or "model" in rules
        defaults = {**vars(module), **getattr(module, "FINETUNE_DEFAULTS", {})}
        for key, allowed in rules.items():
            assert defaults[key] in allowed, f"{name}.{key}"
        with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), f"{name}.py")) as f:
            assert name == "show_morph" or "rules=RULES)" in f.read()


@pytest.mark.parametrize("name, arg, message", [
    ("pretrain", "--micro_batch_size=0", "micro_batch_size=0 from --micro_batch_size=0 is not allowed"),
    ("pretrain", "--epochs=None", "epochs: expected int (default 300), got None"),
    ("pretrain", "--batch_size=None", "batch_size: expected int (default 2048), got None"),
    ("finetune", "--betas=(0.9,)", "betas: expected 2 values like the default (0.9, 0.999), got 1"),
    ("segment", "--model=huge", "model must be one of 'tiny', 'small', 'base', 'large'"),
    ("bench", "--lr=1e999", "lr: inf from --lr=1e999 is not a finite number"),
])
def test_the_reported_bad_settings_are_refused_naming_the_setting(name, arg, message):
    import importlib
    module = importlib.import_module(name)
    with pytest.raises(SystemExit, match=r"config error: .*" + re.escape(message)):
        configure(dict(vars(module)), [arg], module.RULES)


@pytest.mark.parametrize("script, arg, message", [
    ("pretrain.py", "--micro_batch_size=0", "micro_batch_size must be at least 1"),
    ("eval_transfer.py", "--model=huge", "model must be one of 'tiny', 'small', 'base', 'large'"),
])
def test_scripts_refuse_bad_settings_before_any_work(script, arg, message):
    from conftest import run_script
    proc = run_script([script, arg], timeout=120, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("config error: ") and message in proc.stderr


def test_config_file_values_of_other_types_are_converted_or_refused_never_dropped(tmp_path):
    """A path-like becomes its string, a NumPy scalar its Python number; any other type is refused by name (such
    values were silently dropped, the default used instead)."""
    cfg = tmp_path / "run.py"
    cfg.write_text("from pathlib import Path\nimport numpy as np\nout_dir = Path('/data') / 'run'\n"
                   "lr = np.float32(0.5)\nepochs = np.int64(7)\n")
    changes = parse_args([str(cfg)], DEFAULTS)
    assert changes == {"out_dir": "/data/run", "lr": 0.5, "epochs": 7}
    assert type(changes["lr"]) is float and type(changes["epochs"]) is int
    bad = tmp_path / "bad.py"
    bad.write_text("betas = {0.9, 0.98}\n")  # a set, not a tuple
    with pytest.raises(ConfigError, match=r"betas: expected tuple .* got set \{0.9, 0.98\} from config file"):
        parse_args([str(bad)], DEFAULTS)


def test_a_misspelt_setting_is_matched_by_its_name_or_the_words_of_its_comment():
    """--lerning_rate is closest to no name, but to lr's comment ('learning rate at batch 2048'); a name still wins
    where one is close."""
    import pretrain
    with pytest.raises(SystemExit, match=r"unknown setting 'lerning_rate' .*did you mean lr\?"):
        configure(dict(vars(pretrain)), ["--lerning_rate=1e-3"], pretrain.RULES)
    with pytest.raises(SystemExit, match=r"unknown setting 'warmup_epoch' .*did you mean warmup_epochs"):
        configure(dict(vars(pretrain)), ["--warmup_epoch=3"], pretrain.RULES)
