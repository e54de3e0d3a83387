"""`inspect` and `merge` commands (thin: options -> InspectConfig / MergeConfig -> storage functions).

Their options are generated from `INSPECT_OPTIONS` and `MERGE_OPTIONS` (common/config_cli.py), defaults from
storage/config.py; they write no config to replay, so they take no `--config`.
"""

from __future__ import annotations

import click

from common.config_cli import Opt, build_config, config_options
from storage.config import InspectConfig, MergeConfig

INSPECT_OPTIONS: tuple[Opt, ...] = (
    Opt(field="path", flag="PATH", argument=True, help="Teacher directory or single shard."),
    Opt(field="rows", flag="--rows", type=click.IntRange(min=0),
        help="Decode this many sequences (from the first) and show their targets at --position."),
    Opt(field="position", flag="--position", type=click.IntRange(min=0),
        help="Token position inside each decoded sequence whose top-k, mass and entropy are shown."),
    Opt(field="verify", flag="--verify/--no-verify",
        help="Check the sha256 of every shard (and record a verified stamp); --no-verify checks sizes only."),
    Opt(field="as_json", flag="--json", help="Print the report as one JSON object."),
)
MERGE_OPTIONS: tuple[Opt, ...] = (
    Opt(field="path", flag="PATH", argument=True, help="Teacher directory holding the slice manifests."),
    Opt(field="verify", flag="--verify/--no-verify",
        help="Also check the sha256 of every shard before writing (and record a verified stamp)."),
)


@click.command("inspect")
@config_options(InspectConfig, INSPECT_OPTIONS, config_help=None)
@click.pass_context
def inspect_cmd(ctx: click.Context, **kw: object) -> None:
    """Describe a teacher directory or a single shard at PATH (local path or fsspec URL).

    Shows schema, rows, tokens, bytes/token, k, dtypes, teacher metadata and the sha256 status of every
    shard; with --rows, decoded top-k ids/log-probs, the probability mass they cover and the entropy.
    A missing or damaged shard is an error naming the file (exit code 2).
    """
    import json

    from storage.describe import describe, format_report

    cfg = build_config(InspectConfig, INSPECT_OPTIONS, ctx, kw)
    report = describe(cfg.path, rows=cfg.rows, position=cfg.position, verify=cfg.verify)
    click.echo(json.dumps(report, indent=2) if cfg.as_json else format_report(report))


@click.command("merge")
@config_options(MergeConfig, MERGE_OPTIONS, config_help=None)
@click.pass_context
def merge_cmd(ctx: click.Context, **kw: object) -> None:
    """Merge the slice manifests in teacher directory PATH into manifest.json.

    Refuses slices that disagree on run fields, missing slices, and overlapping or missing seq-id ranges.
    A single-slice cache already has its manifest.json: it is checked and left as it is.
    """
    from common.errors import ConfigError
    from storage import fs as sfs
    from storage import shards as shard_io
    from storage.artifacts import Kind, artifact
    from storage.merge import open_manifest, open_slices, slice_manifest_paths, write_merged
    from storage.stamps import write_stamp

    cfg = build_config(MergeConfig, MERGE_OPTIONS, ctx, kw)
    path, verify = cfg.path, cfg.verify
    fs, root = sfs.resolve(path)
    held = artifact(path) if fs.exists(root) else None
    # merge writes only a cache's own manifest.json (and its lock); a path of another kind is refused by name
    # (a missing path, a plain file or a directory of unknown content fails below, where nothing is written)
    if held is not None and held.kind not in (Kind.CACHE, Kind.EMPTY, Kind.FILE, Kind.DIRECTORY):
        raise ConfigError(f"{path} holds {held.phrase()}; merge writes the manifest.json of a teacher cache "
                          "(precompute) only")

    single = not slice_manifest_paths(path)
    if verify:
        shards = (open_manifest(path) if single else open_slices(path)).shards
        for info in shards:
            shard_io.check(fs, root, info)
        write_stamp(fs, root, shards, by="merge")
    merged = write_merged(path)
    target = sfs.join(path, "manifest.json")
    if single:
        click.echo(f"{target} already covers the whole cache (a single-slice run needs no merge): "
                   f"{len(merged.shards)} shards, {merged.num_sequences} sequences, {merged.num_tokens} tokens"
                   + (", sha256 verified" if verify else ""))
        return
    click.echo(f"wrote {target}: {len(merged.shards)} shards, "
               f"{merged.num_sequences} sequences, {merged.num_tokens} tokens from "
               f"{merged.notes.get('merged_from_slices', 1)} slice manifest(s)")

