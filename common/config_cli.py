"""Click options generated from config dataclass fields, and `--config FILE` replay.

A command declares one table of `Opt` rows, each naming a config field by its dotted path
(`loss.lambda_kd`) with the flag, help text and click type. The option's default is read from the
dataclass field, so a default lives in one place (the dataclass). `config_options(Root, table)` decorates the
command with those options plus `--config FILE`; `build_config(Root, table, ctx, values)` makes the config:

    the dataclasses' defaults  <  the values in --config FILE  <  the options given on the command line

A written config (`dataclasses.asdict` as JSON: train-student's RUN/config.json, precompute's
`config-slice-IIIII-of-NNNNN.json`) therefore replays the run it came from; options given beside `--config`
override single fields (e.g. `--output`). A command whose product is one JSON file keeps its config inside it
under a `member` key (evaluate's report and init-student's `init_student.json` under `config`): `--config`
then takes that file too. `check_table(Root, table, internal)` says which fields have no option: every field
must have one or be listed as deliberately internal.

Old spellings of an option are the row's `hidden_aliases`: the one alias mechanism of every command.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass
from typing import Any

import click
from click.core import ParameterSource

from common.config_types import check_types
from common.errors import ConfigError
from common.sidefile import read_side_json

_GIVEN = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


@dataclass(frozen=True, kw_only=True)
class Opt:
    """One command-line option mapped onto one config field."""

    field: str
    """Dotted path of the field in the root config (`loss.lambda_kd`)."""
    flag: str
    """The option, e.g. `--lambda-kd`; `--x/--no-x` for an on/off pair; a bool field with one flag is a flag."""
    help: str
    """Help text (the default is appended by click from the dataclass)."""
    type: Any = None
    """click type (None: text, or a flag for bool fields)."""
    multiple: bool = False
    """Repeatable option (the field takes the list of values, or what `callback` makes of them)."""
    callback: Callable[[click.Context, click.Parameter, Any], Any] | None = None
    """click callback converting the parsed value into the field's value."""
    metavar: str | None = None
    """Placeholder shown in --help."""
    hidden_aliases: tuple[str, ...] = ()
    """Old spellings kept working, hidden from --help (each its own option; giving two spellings is refused)."""
    dest: str | None = None
    """click parameter name (default: the field path with `.` as `__`)."""
    argument: bool = False
    """A positional argument rather than an option (`flag` is its placeholder, e.g. `RUN_DIR`; required, its
    help belongs in the command's docstring)."""

    @property
    def name(self) -> str:
        return self.dest or self.field.replace(".", "__")

    def alias_name(self, i: int) -> str:
        return f"{self.name}__alias{i}"


def _fields_of(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _dataclass_in(tp: Any) -> type | None:
    """The nested config dataclass a field's type names (also as `X | None`), else None. A union of several
    dataclasses (a typed choice such as the backend options) is a leaf: its value is kept as it is (a dict
    from a file) for the owning config to turn into the chosen class."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return inner[0] if len(inner) == 1 else None
    return None


def resolve_field(root: type, path: str) -> tuple[dataclasses.Field, Any]:
    """(the dataclasses.Field, its type) at dotted `path` below dataclass `root`."""
    cls: Any = root
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = _fields_of(cls)
        if part not in fields:
            raise KeyError(f"{root.__name__} has no field {'.'.join(parts[: i + 1])}")
        f, tp = fields[part]
        if i == len(parts) - 1:
            return f, tp
        cls = _dataclass_in(tp)
        if cls is None:
            raise KeyError(f"{root.__name__}.{'.'.join(parts[: i + 1])} is not a config dataclass")
    raise KeyError(path)


def field_default(root: type, path: str) -> Any:
    """The default of the field at `path` (MISSING when it has none)."""
    f, _ = resolve_field(root, path)
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def leaf_paths(root: type, prefix: str = "") -> list[str]:
    """Dotted paths of every non-dataclass field below `root` (nested config dataclasses are descended)."""
    out = []
    for name, (_, tp) in _fields_of(root).items():
        inner = _dataclass_in(tp)
        out += leaf_paths(inner, f"{prefix}{name}.") if inner is not None else [f"{prefix}{name}"]
    return out


def check_table(root: type, table: Sequence[Opt], internal: Sequence[str] = ()) -> list[str]:
    """The fields of `root` that have no option and are not listed in `internal` (should be empty), after
    checking that every row names a real field and no field has two rows."""
    paths = [o.field for o in table]
    for p in paths:
        resolve_field(root, p)  # KeyError for a row naming no field
    dup = sorted({p for p in paths if paths.count(p) > 1})
    assert not dup, f"fields with two options: {dup}"
    return [p for p in leaf_paths(root) if p not in paths and p not in internal]


CORPUS_SOURCE_FLAGS = {"dataset": "--dataset", "dataset_config": "--dataset-config", "split": "--split",
                       "revision": "--dataset-revision", "text_field": "--text-field"}
"""The options naming a text corpus, by `CorpusConfig` field (common/corpus.py), in --help order."""


def corpus_source_options(*, dataset_help: str, prefix: str = "", fields: Mapping[str, str | None] | None = None,
                          split_help: str = "Hub dataset split.", revision_help: str = "Hub dataset revision.",
                          text_field_help: str = "Field holding the document text.",
                          dataset_aliases: tuple[str, ...] = ()) -> tuple[Opt, ...]:
    """The rows of `CORPUS_SOURCE_FLAGS`, one vocabulary for every command that reads text: each maps onto
    `prefix + name`, where `fields` renames a `CorpusConfig` field for a config that spells it otherwise
    (evaluate's `data`) or drops its row with None (init-student has no `--dataset-revision`). The help texts
    that differ between commands are arguments; `dataset_aliases` are --dataset's old spellings."""
    names: dict[str, str | None] = {key: key for key in CORPUS_SOURCE_FLAGS}
    names.update(fields or {})
    helps = {"dataset": dataset_help, "dataset_config": "Hub dataset configuration (e.g. en for allenai/c4).",
             "split": split_help, "revision": revision_help, "text_field": text_field_help}
    rows = []
    for key, flag in CORPUS_SOURCE_FLAGS.items():
        name = names[key]
        if name is not None:
            rows.append(Opt(field=prefix + name, flag=flag, help=helps[key],
                            hidden_aliases=dataset_aliases if key == "dataset" else ()))
    return tuple(rows)


def config_options(root: type, table: Sequence[Opt], *, config_help: str | None) -> Callable[[Any], Any]:
    """Decorator adding one click option (or argument) per `table` row (default: the field's) and `--config
    FILE`; a command that writes no config to replay (`config_help=None`) gets no `--config`."""

    def decorate(fn: Any) -> Any:
        for opt in reversed(table):
            if opt.argument:
                fn = click.argument(opt.name, metavar=opt.flag, type=opt.type, callback=opt.callback)(fn)
                continue
            default = field_default(root, opt.field)
            _, tp = resolve_field(root, opt.field)
            for i, alias in reversed(list(enumerate(opt.hidden_aliases))):
                fn = click.option(alias, opt.alias_name(i), type=opt.type, multiple=opt.multiple,
                                  callback=opt.callback, hidden=True, default=None,
                                  help=f"Old spelling of {opt.flag.split('/')[0]}.")(fn)
            kw: dict[str, Any] = dict(help=opt.help, metavar=opt.metavar, callback=opt.callback)
            # flags and repeatable options get click's own default (none) where the field's is off or empty, as
            # in the other commands
            if tp is bool and "/" not in opt.flag:  # a flag: off unless given (or on by default)
                kw.update(is_flag=True, default=bool(default))
            else:
                if opt.multiple:
                    if default not in (MISSING, None) and len(default):
                        kw["default"] = tuple(default)
                elif default is None:
                    kw["default"] = None
                elif default is MISSING:  # a required field: required unless --config gives it
                    pass
                else:  # a list default as a tuple: click options' defaults are compared and hashed
                    kw["default"] = tuple(default) if isinstance(default, list) else default
                    kw["show_default"] = True
                kw.update(type=opt.type, multiple=opt.multiple)
            fn = click.option(opt.flag, opt.name, **kw)(fn)
        if config_help is None:
            return fn
        return click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                            help=config_help)(fn)

    return decorate


def build_config(root: type, table: Sequence[Opt], ctx: click.Context, values: dict[str, Any], *,
                 member: str | None = None) -> Any:
    """The `root` config from --config FILE (if given) overlaid with the options given on the command line.

    With `member`, a file holding an object under that key (a command's own output that records its config
    there) gives that object; any other file is the config itself. Missing required options are a click.UsageError naming the flag; a file that cannot be read, is not a
    config of this command, names unknown fields or holds a value of the wrong type (`check_types`) is a
    ConfigError naming it."""
    tree: dict[str, Any] = {}
    path = values.get("config_file")
    if path is not None:
        tree = check_types(root, read_config_file(path, member=member), where=f"--config {path}")
    for opt in table:
        given = [(opt.flag, opt.name)] + [(a, opt.alias_name(i)) for i, a in enumerate(opt.hidden_aliases)]
        given = [(flag, name) for flag, name in given if ctx.get_parameter_source(name) in _GIVEN]
        if len(given) > 1:
            raise click.UsageError(f"give {opt.flag.split('/')[0]} once ({', '.join(f for f, _ in given[1:])} "
                                   "is its old spelling)", ctx)
        if given or path is None:
            name = given[0][1] if given else opt.name
            _, tp = resolve_field(root, opt.field)
            _set(tree, opt.field, _coerce(tp, values[name]))
    for opt in table:
        if field_default(root, opt.field) is MISSING and _get(tree, opt.field) in (MISSING, None, (), []):
            raise click.UsageError(f"Missing option '{opt.flag}' (or --config FILE)", ctx)
    try:
        return from_dict(root, tree, where=path or "the command line")
    except TypeError as e:  # a value of the wrong type in the file
        raise ConfigError(f"--config {path}: {e}") from None


def read_config_file(path: str, *, member: str | None = None) -> dict[str, Any]:
    """The JSON object in `path`, or its `member` object when it has one (ConfigError naming the file
    otherwise)."""
    try:  # a regular file of bounded size only: `--config /dev/zero` would be read without end
        tree = read_side_json(path, label=f"--config {path}", error=ConfigError)
    except FileNotFoundError as e:
        raise ConfigError(f"--config {path}: cannot read ({e.strerror or e})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of config fields")
    if member is not None and member in tree:
        tree = tree[member]
        if not isinstance(tree, dict):
            raise ConfigError(f"--config {path}: its {member!r} member is not a JSON object of config fields")
    return tree


def from_dict(cls: type, data: dict[str, Any], *, where: str) -> Any:
    """Construct dataclass `cls` from a nested dict (as `dataclasses.asdict` wrote it): nested dataclasses are
    built recursively, JSON lists become tuples where the field is a tuple; unknown keys are a ConfigError."""
    fields = _fields_of(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown {cls.__name__} field(s) {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        _, tp = fields[name]
        inner = _dataclass_in(tp)
        if inner is not None and isinstance(value, dict):
            value = from_dict(inner, value, where=where)
        kwargs[name] = _coerce(tp, value)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any) -> Any:
    """A JSON list or click tuple as the sequence type the field declares (list or tuple, also in `X | None`),
    so a replayed config equals the original one."""
    if not isinstance(value, (list, tuple)):
        return value
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    origins = {typing.get_origin(a) or a for a in options}
    if tuple in origins:
        return tuple(value)
    if list in origins:
        return list(value)
    return value


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config field {p} must be an object")
    node[leaf] = value


def _get(tree: dict[str, Any], path: str) -> Any:
    node: Any = tree
    for p in path.split("."):
        if not isinstance(node, dict) or p not in node:
            return MISSING
        node = node[p]
    return node
