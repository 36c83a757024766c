"""Settings as module-level globals, overridden by config files and --key=value arguments (nanoGPT style).

A stage script declares its settings as plain globals, then calls

    config = configure(globals())

which applies, in order, every positional argument that is a config file (a Python file that assigns some of
the settings) and every `--key=value` override, checks each against the type of its default, writes the result
back into the script's globals, prints it once (rank 0) and returns it as a dict for the checkpoints.

    python pretrain.py config/pretrain_demo.py --epochs=3 --lr=1 --compile --out_dir=out/run1

Values are parsed with `ast.literal_eval`, falling back to the plain string. An int is accepted for a float
setting; `--key value` works like `--key=value`; a bare `--flag` sets a bool setting to True.
"""
import ast
import difflib
import os
import sys

SETTING_TYPES = (bool, int, float, str, tuple, list, dict, type(None))


class ConfigError(ValueError):
    pass


def settings_of(namespace: dict) -> dict:
    """The settings a script declared: public lower-case globals of plain types (no modules, functions,
    classes or CONSTANTS)."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not k.isupper() and isinstance(v, SETTING_TYPES)}


def _unknown(key: str, known: dict, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown setting {key!r} in {where}{hint}")


def coerce(key: str, value, default, where: str):
    """Check `value` against the type of the setting's default and convert where that is lossless."""
    if default is None or value is None:
        return value  # a setting without a typed default takes anything; any setting may be set to None
    expected = type(default)
    if expected is float and type(value) is int:
        return float(value)
    if expected is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if expected is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected str, got {value!r} from {where}; quote it, e.g. --{key}='{value}'")
    if expected in (tuple, list) and isinstance(value, (tuple, list)):
        return expected(value)
    if type(value) is not expected:
        raise ConfigError(f"{key}: expected {expected.__name__} (default {default!r}), "
                          f"got {type(value).__name__} {value!r} from {where}")
    return value


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a plain string, e.g. --data_dir=/data/imagenet


def parse_args(argv: list[str], defaults: dict) -> dict:
    """Resolve config files and overrides in `argv` against `defaults`; return the changed settings."""
    changes = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg!r} does not exist (positional arguments are config files; "
                                  f"settings are given as --key=value)")
            namespace = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), namespace)
            for key, value in settings_of(namespace).items():
                if key not in defaults:
                    raise _unknown(key, defaults, f"config file {arg}")
                changes[key] = coerce(key, value, defaults[key], f"config file {arg}")
            continue
        key, eq, text = arg[2:].partition("=")
        if key not in defaults:
            raise _unknown(key, defaults, "the command line")
        if not eq:  # --key value, or a bare --flag
            has_value = i < len(argv) and not argv[i].startswith("--")
            if isinstance(defaults[key], bool) and not (has_value and argv[i].lower() in ("true", "false")):
                changes[key] = True
                continue
            if not has_value:
                raise ConfigError(f"--{key} needs a value: write --{key}=VALUE")
            text = argv[i]
            i += 1
        changes[key] = coerce(key, _parse_value(text), defaults[key], f"--{key}={text}")
    return changes


def configure(namespace: dict, argv: list[str] | None = None) -> dict:
    """Apply config files and overrides from `argv` (default: sys.argv[1:]) to the script's globals."""
    defaults = settings_of(namespace)
    try:
        changes = parse_args(sys.argv[1:] if argv is None else argv, defaults)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    namespace.update(changes)
    config = {**defaults, **changes}
    if int(os.environ.get("RANK", 0)) == 0:
        width = max(map(len, config), default=0)
        print("configuration:\n" + "\n".join(f"  {k:<{width}} = {v!r}" for k, v in config.items()), flush=True)
    return config
