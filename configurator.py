"""Settings as module-level globals, overridden by config files and --key=value arguments (nanoGPT style).

A stage script declares its settings as plain globals, then calls

    config = configure(globals())

which applies, in order, every positional argument that is a config file (a Python file that assigns some of
the settings) and every `--key=value` override, checks each against the type of its default, writes the result
back into the script's globals, prints it once (rank 0) and returns it as a dict for the checkpoints.

    python pretrain.py config/pretrain_demo.py --epochs=3 --lr=1 --compile --out_dir=out/run1

Values are parsed with `ast.literal_eval`, falling back to the plain string. An int is accepted for a float
setting; `--key value` works like `--key=value`; a bare `--flag` sets a bool setting to True. A setting whose
default is typed refuses None, a non-finite float (`--lr=1e999` parses as inf) and a tuple of another length
(a tuple is a record like betas; a list setting takes any length).
A script may pass `rules`, {setting: allowed values}, a tuple of choices or a range (`at_least(1)`), checked
for every value however it was given. `--help` (or `-h`) prints every setting, its default and the comment
beside it in the script's source, and exits.
"""
import ast
import difflib
import io
import math
import os
import sys
import tokenize

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


class Range:
    """Allowed numbers low <= x <= high, used as a rule: `value in Range(1)`."""

    def __init__(self, low: float = -math.inf, high: float = math.inf):
        self.low, self.high = low, high

    def __contains__(self, value) -> bool:
        return self.low <= value <= self.high

    def __str__(self):
        return f"at least {self.low}" if self.high == math.inf else f"between {self.low} and {self.high}"


def at_least(low: float) -> Range:
    return Range(low)


def describe(allowed) -> str:
    return str(allowed) if isinstance(allowed, Range) else "one of " + ", ".join(map(repr, allowed))


def coerce(key: str, value, default, where: str, allowed=None):
    """Check `value` against the type of the setting's default (and its rule, if any) and convert where that is
    lossless. A tuple's elements are checked against the default's elements."""
    value = _coerce_type(key, value, default, where)
    if allowed is not None and value is not None and value not in allowed:
        raise ConfigError(f"{key}={value!r} from {where} is not allowed: {key} must be {describe(allowed)}")
    return value


def _coerce_type(key: str, value, default, where: str):
    if default is None:
        return value  # a setting without a typed default takes anything
    expected = type(default)
    if value is None:
        raise ConfigError(f"{key}: expected {expected.__name__} (default {default!r}), got None from {where}; "
                          f"only settings whose default is None take None")
    if expected is float and type(value) is int:
        value = float(value)
    if expected is float and type(value) is float and not math.isfinite(value):
        raise ConfigError(f"{key}: {value} from {where} is not a finite number")
    if expected is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if expected is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected str, got {value!r} from {where}; quote it, e.g. --{key}='{value}'")
    if expected in (tuple, list) and isinstance(value, (tuple, list)):
        if expected is tuple:  # a record of fixed length (betas, scale); a list is a sequence of any length
            if len(value) != len(default):
                raise ConfigError(f"{key}: expected {len(default)} values like the default {default!r}, "
                                  f"got {len(value)}: {value!r} from {where}")
            value = [_coerce_type(f"{key}[{i}]", v, d, where) for i, (v, d) in enumerate(zip(value, default))]
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


def parse_args(argv: list[str], defaults: dict, rules: dict | None = None) -> dict:
    """Resolve config files and overrides in `argv` against `defaults` (and `rules`, {setting: allowed values});
    return the changed settings."""
    rules = rules or {}
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
                changes[key] = coerce(key, value, defaults[key], f"config file {arg}", rules.get(key))
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
        changes[key] = coerce(key, _parse_value(text), defaults[key], f"--{key}={text}", rules.get(key))
    return changes


def configure(namespace: dict, argv: list[str] | None = None, rules: dict | None = None) -> dict:
    """Apply config files and overrides from `argv` (default: sys.argv[1:]) to the script's globals, checking
    each value against `rules` ({setting: a tuple of choices or a Range}). `--help` or `-h`: print the settings
    and exit."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = settings_of(namespace)
    assert not set(rules or {}) - set(defaults), f"rules for unknown settings: {set(rules) - set(defaults)}"
    if "--help" in argv or "-h" in argv:
        print(help_text(namespace, rules or {}))
        sys.exit(0)
    try:
        changes = parse_args(argv, defaults, rules)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    namespace.update(changes)
    config = {**defaults, **changes}
    if int(os.environ.get("RANK", 0)) == 0:
        width = max(map(len, config), default=0)
        print("configuration:\n" + "\n".join(f"  {k:<{width}} = {v!r}" for k, v in config.items()), flush=True)
    return config


# ------------------------------------------------------------------------------------------------------ help
def source_comments(path: str) -> dict:
    """{setting: (comment beside it, the comment line just above it)} for the top-level `name = value` lines of a
    Python file."""
    with open(path) as f:
        source = f.read()
    beside, alone = {}, {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            (alone if token.line.strip().startswith("#") else beside)[token.start[0]] = text
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = (beside.get(node.end_lineno, ""), alone.get(node.lineno - 1, ""))
    return found


def help_text(namespace: dict, rules: dict) -> str:
    """Every setting with its default and its comment: from the script's source, or for settings it takes from
    a module beside it (eval_transfer.py takes finetune.py's) from that module's source."""
    script = namespace.get("__file__", "script.py")
    sources = [script] + [m.__file__ for m in namespace.values() if type(m) is type(sys) and
                          getattr(m, "__file__", None) and os.path.dirname(m.__file__) == os.path.dirname(script)]
    comments = {}
    for path in reversed(sources):  # the script's own comments win, where it has one
        if path.endswith(".py") and os.path.isfile(path):
            comments.update({k: c for k, c in source_comments(path).items() if c[0] or k not in comments})
    name = os.path.basename(script)
    doc = (namespace.get("__doc__") or "").strip().split("\n\n")[0]
    lines = [f"usage: python {name} [config_file.py ...] [--key=value ...]", "", doc, "",
             "settings (--key=default, then the comment in the source):"]
    section = None
    for key, default in settings_of(namespace).items():
        comment, above = comments.get(key, ("", ""))
        if above and above != section and not above.startswith("-"):  # a section, not a divider
            lines.append(f"  # {above}")
        section = above or section
        rule = f" [{describe(rules[key])}]" if key in rules else ""
        lines.append(f"  --{key}={default!r}" + (f"  {comment}" if comment else "") + rule)
    return "\n".join(lines)
