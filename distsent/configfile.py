"""Config files: YAML (and `key.sub=value` overrides) onto the schema of config.py, strictly checked, and back."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import typing
from pathlib import Path

import yaml

from .config import ConfigError, ExperimentConfig
from .files import atomic_write


# --- building dataclasses from plain data ----------------------------------------------------------------------

def _got(value) -> str:
    """A value in an error message: its type as the user wrote it (int, not the loader's _Int) and the value."""
    kind = {_Int: "int", _Float: "float"}.get(type(value), type(value).__name__)
    return f"{kind} {value!r}"


def _convert(key: str, tp, value):
    """Check `value` against the annotation `tp` and return it in that type; errors name `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        value = {} if value is None else value  # a section whose keys are all commented out (`train:` alone)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {_got(value)}")
        return _build(tp, value, key + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_got(value)}")
        return [_convert(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if tp in (bool, int):
        value = _unquoted(value)
    if tp is bool:
        if isinstance(value, str) and value.lower() in _YAML11_BOOLS:  # `yes`, `off`: booleans to YAML 1.1 users
            return _YAML11_BOOLS[value.lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_got(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_got(value)}")
        if abs(value) >= 2**63:  # numpy, torch and datetime overflow on it (a typo of extra digits)
            raise ConfigError(f"{key}: {int(value)} is out of range (|n| < 2**63)")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # a quoted number: '0.01'
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_got(value)}")
        try:
            return float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise ConfigError(f"{key}: the integer is too large for a number") from None
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            quote = "; quote a name that YAML reads as true or false ('True')" if isinstance(value, bool) else ""
            raise ConfigError(f"{key}: expected a string, got {_got(value)}{quote}")
        return getattr(value, "text", str(value))  # a number as written: 007 or 1:30, not 7 or 90
    raise TypeError(f"{key}: unsupported annotation {tp!r}")


def _unquoted(value):
    """A quoted '3' or 'true' read as it would be unquoted, as a quoted '0.01' or 'yes' is: the setting's type
    decides, not the quotes."""
    if isinstance(value, str):
        with contextlib.suppress(yaml.YAMLError, ConfigError):
            read = _yaml(value)
            if isinstance(read, (bool, int)):
                return read
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)  # YAML keys may be numbers, booleans or null too
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), names, n=1)  # a typo: the key it likely meant
        meant = f"; did you mean {prefix}{close[0]}?" if close else ""
        section = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key{meant} (known keys of {section}: "
                          f"{', '.join(sorted(names))})")
    kwargs = {name: _convert(prefix + name, hints[name], value) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix.rstrip('.')}: {exc}") from exc


def _set_path(data: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:  # absent, or an empty section (`train:` alone)
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is not a section, cannot set {dotted}")
        node = child
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        _merge(node[parts[-1]], value)  # train={epochs: 2} sets a key of the section, not the section alone
    else:
        node[parts[-1]] = value


def _leaves(key: str, value) -> list[str]:
    """The keys an override sets: train={seed: 1} sets train.seed, not the file's other train keys."""
    if not isinstance(value, dict) or not value:
        return [key]
    return [leaf for k, v in value.items() for leaf in _leaves(f"{key}.{k}", v)]


def _merge(into: dict, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


class _Loader(yaml.SafeLoader):
    """YAML with only true/false as booleans (YAML 1.2): YAML 1.1 also reads yes/no/on/off/y/n as booleans, which
    turned `mixed_precision: no` into False. Fields typed bool still take those words (_YAML11_BOOLS). A key given
    twice in one mapping is refused: YAML keeps the last, and a second `train:` section would drop the first."""

    def construct_document(self, node):
        _refuse_repeated_keys(node)
        return super().construct_document(node)


def _refuse_repeated_keys(node, path: str = "", seen: set | None = None) -> None:
    """A key given twice in one mapping, named with its section (`train.epochs`) and both lines."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already walked (or of its own parent)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_repeated_keys(item, path, seen)
    if not isinstance(node, yaml.MappingNode):
        return
    lines: dict[tuple, int] = {}
    for key_node, value_node in node.value:
        name = f"{path}.{key_node.value}" if path else str(key_node.value)
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            name = path  # `<<: *defaults`, resolved by the base class; a list as a key: refused by it
        elif (key_node.tag, key_node.value) in lines:
            raise ConfigError(f"{name}: given twice (lines {lines[key_node.tag, key_node.value]} and "
                              f"{key_node.start_mark.line + 1}); the second would replace the first")
        else:
            lines[key_node.tag, key_node.value] = key_node.start_mark.line + 1
        _refuse_repeated_keys(value_node, name, seen)


# YAML 1.2's core schema for booleans, integers and floats, and no dates: YAML 1.1 read 010 as 8 (octal), 1:30 as 90
# (base 60) and 2024-01-01 as a date, which no setting takes
_YAML11_ONLY = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                "tag:yaml.org,2002:timestamp"}
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML11_ONLY]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                              list("-+0123456789"))  # 100_000 as YAML 1.1 read it
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))
_YAML11_BOOLS = {"yes": True, "y": True, "on": True, "no": False, "n": False, "off": False}


class _Int(int):
    """A YAML integer that keeps its text, for fields typed str (007 as a class name is not 7)."""


class _Float(float):
    """A YAML float that keeps its text (1.50 is not 1.5 as a class name)."""


def _keeping_text(kind, construct):
    def constructor(loader, node):
        value = kind(construct(loader, node))
        value.text = node.value
        return value
    return constructor


def _yaml12_int(loader, node) -> int:
    text = node.value
    return int(text[2:], 8 if text[1] == "o" else 16) if text[:2] in ("0o", "0x") else int(text.replace("_", ""))


_Loader.add_constructor("tag:yaml.org,2002:int", _keeping_text(_Int, _yaml12_int))
_Loader.add_constructor("tag:yaml.org,2002:float", _keeping_text(_Float, yaml.SafeLoader.construct_yaml_float))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> tuple[str, object]:
    """`key.sub=value` -> ("key.sub", value), the value read as YAML (so 3 is an int, [a, b] a list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    value, rest = "", ""
    if raw.strip():
        loader = _Loader(raw)
        try:
            node = loader.get_single_node()
            value = loader.construct_document(node) if node is not None else None
            rest = raw[node.end_mark.index:] if node is not None else raw
        except (yaml.YAMLError, ConfigError) as exc:
            raise ConfigError(f"{key.strip()}: cannot read value {raw!r}: {exc}") from exc
        finally:
            loader.dispose()
    if rest.strip():  # only a comment is left after the value: `notes=lr sweep #3` would be read as `lr sweep`
        raise ConfigError(f"{key.strip()}: the value {raw!r} holds a # that YAML takes for a comment, cutting the "
                          f"value short: quote it (\"{key.strip()}='...'\" in a shell)")
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML file (or start from the defaults), apply overrides, and check every key and type."""
    data: dict = {}
    if path is not None:
        try:
            path = Path(path).expanduser()
        except RuntimeError:  # ~name of no user (or no home): the name as written
            path = Path(path)
        try:  # any readable file: a pipe too (--config <(...))
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            # `--config <(...)` under accelerate launch / torchrun: the pipe is the launcher's, not its processes'
            pipe = " (a pipe, --config <(...), that this process was not given: the processes a launcher starts " \
                   "cannot read the launcher's; write the config to a file)" if str(path).startswith(("/dev/fd/",
                                                                                                  "/proc/")) else ""
            raise ConfigError(f"config file {path} does not exist{pipe}") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a folder; name a YAML file (configs/*.yaml)") from None
        except OSError as exc:
            raise ConfigError(f"config file {path}: cannot read it: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                              f"{exc.start}); save it as UTF-8") from None
        try:
            data = _yaml(text) or {}
            if not isinstance(data, dict):
                raise ConfigError("the top level must be a mapping of keys")
            data = _upgrade(data)  # before the overrides: model.ngram_max_n=2 wins over an old file's ngram_dim
            if path.suffix.lower() in (".yaml", ".yml"):  # a user's config of its own: not IMDB's folder
                data.setdefault("output_dir", f"runs/{path.stem}")
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    given = {}  # key -> the override that set it, to blame the command line rather than the file
    for text in overrides:
        key, value = parse_override(text)
        try:
            _set_path(data, key, value)
        except ConfigError as exc:  # `train: 3` in the file, then train.epochs=3
            raise ConfigError(f"the override {text}: {exc}" + (f" (in {path})" if path is not None else "")) from None
        given.update({k: text for k in _leaves(key, value)})
    try:
        return _build(ExperimentConfig, _upgrade(data))
    except ConfigError as exc:
        bad = str(exc).split(":", 1)[0]  # every message starts with the full key path
        # the override set that key, a key inside it, or a key under it (a misspelt section: trian.epochs)
        override = next((t for k, t in given.items() if bad == k or bad.startswith((k + ".", k + "["))
                         or k.startswith(bad + ".")), None)
        where = f"the override {override}: " if override else f"{path}: " if path is not None else ""
        raise ConfigError(where + str(exc)) from None


def config_from_dict(data: dict) -> ExperimentConfig:
    return _build(ExperimentConfig, _upgrade(data))


def _upgrade(data: dict) -> dict:
    """Read configs saved by earlier versions, whose run folders hold every key of their day.

    `model.ngram_dim` (a fastText-style bag, since replaced by the n-gram head) was saved by every run, mostly as 0,
    beside `model.ngram_max_n: 2`, which now would switch the n-gram head on: such a config means no n-gram head.
    """
    model = data.get("model")
    if isinstance(model, dict) and "ngram_dim" in model:
        model = dict(model)
        if model.pop("ngram_dim"):
            raise ConfigError("model.ngram_dim: this model was trained with the fastText-style n-gram bag, which this "
                              "version replaced by the n-gram head (model.ngram_max_n); retrain it to use it here")
        model["ngram_max_n"] = 0
        data = {**data, "model": model}
    return data


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    atomic_write(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def saved_settings(path: str | Path) -> dict:
    """A saved config.yaml (a run's, written by its last launch) as plain data; {} if there is no readable one."""
    try:
        old = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return old if isinstance(old, dict) else {}


def changes_since(path: str | Path, cfg: ExperimentConfig, skip: tuple[str, ...] = ()) -> list[str]:
    """The settings of `cfg` that differ from a saved config.yaml (a run's, written by its last launch), each as
    "key old -> new", less the keys in `skip`; none if there is no readable file."""
    out = []

    def walk(before: dict, now: dict, prefix: str) -> None:
        for key, value in now.items():
            if isinstance(value, dict) and isinstance(before.get(key), dict):
                walk(before[key], value, f"{prefix}{key}.")
            elif key in before and before[key] != value and prefix + key not in skip:
                out.append(f"{prefix}{key} {before[key]!r} -> {value!r}")

    walk(saved_settings(path), cfg.to_dict(), "")
    return out


def describe(cls=ExperimentConfig, prefix: str = "", values=None) -> list[str]:
    """One line per key with its default and documentation: the config reference. With `values` (a loaded config),
    each key shows its value there, and the default beside it where they differ."""
    lines = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        value = getattr(values, f.name) if values is not None else None
        if dataclasses.is_dataclass(hint):
            lines.extend(describe(hint, prefix + f.name + ".", value))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = f"{default!r}" if values is None or value == default else f"{value!r} (default {default!r})"
        lines.append(f"{prefix}{f.name} = {shown}: {f.metadata.get('doc', '')}")
    return lines
