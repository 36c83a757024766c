"""Settings as module-level globals, overridden by config files and --key=value arguments (nanoGPT style).

A script declares its settings as plain commented globals, then reads them once:

    cfg = configure(globals(), rules=RULES)
    main(cfg)

configure() applies, in order, every positional argument that is a config file (a Python file that assigns some
of the settings) and every `--key=value` override, checks each against the type of its default and the script's
`rules` ({setting: a tuple of choices or a Range}), prints the result once (rank 0), writes it back into the
script's globals and returns it as one namespace, `cfg`. `cfg.given` names the settings a file or the command
line set. Other code (eval_transfer.py, the tests) builds a script's cfg with `settings(module, ...)`.

    python pretrain.py config/pretrain_demo.py --epochs=3 --lr=1 --compile --out_dir=out/run1

Values are parsed with `ast.literal_eval`, falling back to the plain string. An int is accepted for a float
setting; `--key value` works like `--key=value`; a bare `--flag` sets a bool setting to True. A config file's
path-like values become strings and NumPy scalars Python numbers; any other value of the wrong type is refused
by name. A setting whose default is typed refuses None, a non-finite float (`--lr=1e999` parses as inf) and a
tuple of another length (a tuple is a record like betas; a list setting takes any length). `--help` (or `-h`)
prints every setting, its default and the comment beside it in the script's source, and exits.
"""
import ast
import difflib
import io
import math
import os
import sys
import tokenize
from types import SimpleNamespace

SETTING_TYPES = (bool, int, float, str, tuple, list, dict, type(None))


class ConfigError(ValueError):
    pass


class Config(SimpleNamespace):
    """A script's settings as attributes (vars(cfg): all of them); `given`: the names a config file or the
    command line set, kept apart from the settings."""
    __slots__ = ("given",)


def settings_of(namespace: dict) -> dict:
    """The settings a script declared: public lower-case globals of plain types (no modules, functions,
    classes or CONSTANTS)."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not k.isupper() and isinstance(v, SETTING_TYPES)}


def _unknown(key: str, known: dict, where: str, comments: dict) -> ConfigError:
    """An unknown setting, with the settings whose name, or a phrase of whose comment ('learning rate' for
    --lerning_rate), is closest to it."""
    candidates = {name: name for name in known}
    for name, (beside, _) in comments.items():
        words = [w.lower() for w in beside.replace("-", " ").split() if w.isalpha()]
        for n in (1, 2, 3):  # a comment's phrases of up to three words, as one name: learning_rate
            for i in range(len(words) - n + 1):
                candidates.setdefault("_".join(words[i:i + n]), name)
    score = {c: min(difflib.SequenceMatcher(None, key, c).ratio(), difflib.SequenceMatcher(None, c, key).ratio())
             for c in candidates}
    best = max(score.values(), default=0)  # the closest, and those nearly as close
    close = list(dict.fromkeys(candidates[c] for c in sorted(score, key=score.get, reverse=True)
                               if score[c] >= max(0.6, best - 0.1)))
    close = [name for name in close if name in known][:3]
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


def _plain(value):
    """A path-like as its string, a NumPy scalar as the Python number it holds; anything else unchanged."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def _coerce_type(key: str, value, default, where: str):
    value = _plain(value)
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


def read_config_file(path: str) -> dict:
    """The values a config file assigns: its public lower-case names, except modules, functions and classes
    (a file may import what it needs). Values of other types are returned as they are, to be checked."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist (positional arguments are config files; "
                          f"settings are given as --key=value)")
    namespace = {}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), namespace)
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not k.isupper()
            and not callable(v) and type(v) is not type(sys)}


def parse_args(argv: list[str], defaults: dict, rules: dict | None = None, comments: dict | None = None) -> dict:
    """Resolve config files and overrides in `argv` against `defaults` (and `rules`, {setting: allowed values});
    return the changed settings. `comments` ({setting: (comment, ...)}) help to suggest a misspelt setting."""
    rules, comments = rules or {}, comments or {}
    changes = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            where = f"config file {arg}"
            for key, value in read_config_file(arg).items():
                if key not in defaults:
                    raise _unknown(key, defaults, where, comments)
                changes[key] = coerce(key, value, defaults[key], where, rules.get(key))
            continue
        key, eq, text = arg[2:].partition("=")
        if key not in defaults:
            raise _unknown(key, defaults, "the command line", comments)
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


def _config(defaults: dict, changes: dict) -> Config:
    cfg = Config(**{**defaults, **changes})
    cfg.given = frozenset(changes)
    return cfg


def settings(namespace, *config_files: str, rules: dict | None = None, **overrides) -> Config:
    """A script's cfg as configure() would make it, for other code: the settings of `namespace` (a module or
    a dict of globals), then `config_files`, then `overrides` (Python values), each checked as configure()
    checks them (rules: the module's RULES unless given). Errors raise ConfigError."""
    namespace = vars(namespace) if type(namespace) is type(sys) else namespace
    defaults = settings_of(namespace)
    rules = namespace.get("RULES", {}) if rules is None else rules
    changes = parse_args(list(config_files), defaults, rules)
    for key, value in overrides.items():
        if key not in defaults:
            raise _unknown(key, defaults, "the overrides", {})
        changes[key] = coerce(key, value, defaults[key], "the overrides", rules.get(key))
    return _config(defaults, changes)


def configure(namespace: dict, argv: list[str] | None = None, rules: dict | None = None) -> Config:
    """A script's cfg from config files and overrides in `argv` (default: sys.argv[1:]), each checked against
    its default's type and `rules` ({setting: a tuple of choices or a Range}); written back into the script's
    globals and printed once. `--help` or `-h`: print the settings and exit. A bad value exits naming it."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = settings_of(namespace)
    assert not set(rules or {}) - set(defaults), f"rules for unknown settings: {set(rules) - set(defaults)}"
    if "--help" in argv or "-h" in argv:
        print(help_text(namespace, rules or {}))
        sys.exit(0)
    try:
        changes = parse_args(argv, defaults, rules, script_comments(namespace))
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    namespace.update(changes)
    cfg = _config(defaults, changes)
    if int(os.environ.get("RANK", 0)) == 0:
        width = max(map(len, defaults), default=0)
        print("configuration:\n" + "\n".join(f"  {k:<{width}} = {v!r}" for k, v in vars(cfg).items()), flush=True)
    return cfg


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


def script_comments(namespace: dict) -> dict:
    """The comments of a script's settings: from its source, or for settings it takes from a module beside it
    (eval_transfer.py takes finetune.py's) from that module's source; the script's own win."""
    script = namespace.get("__file__", "")
    sources = [script] + [m.__file__ for m in namespace.values() if type(m) is type(sys) and
                          getattr(m, "__file__", None) and os.path.dirname(m.__file__) == os.path.dirname(script)]
    comments = {}
    for path in reversed(sources):
        if path.endswith(".py") and os.path.isfile(path):
            comments.update({k: c for k, c in source_comments(path).items() if c[0] or k not in comments})
    return comments


def help_text(namespace: dict, rules: dict) -> str:
    """Every setting with its default and its comment in the source."""
    comments = script_comments(namespace)
    name = os.path.basename(namespace.get("__file__", "script.py"))
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
