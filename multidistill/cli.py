"""The command line: the click group of every command (`multidistill COMMAND --help` once installed, or
`python cli.py COMMAND --help` from a checkout).

The CLI is thin: each command builds a config dataclass and calls one `run_*` function. Errors caused by
user input (common.errors.UserError) and bad option values (click.UsageError) are printed as one line
and exit with code 2. This package sits above both stages: it is the one place that imports them all.
"""

from __future__ import annotations

import sys

import click

from common.errors import UserError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):  # one line and exit 2 for user errors, tracebacks for bugs
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except click.UsageError as e:  # a bad option value of a command: the same one line, not a usage dump
            hint = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Offline multi-teacher knowledge distillation for language models.

    \b
    Stage one, once per teacher:   precompute     (teacher top-k log-probs, entropy, pooled states -> shards)
    Cut a student from a teacher:  init-student   (depth pruning, blocks by Block Influence)
    Stage two, from K caches:      train-student  (fused entropy-weighted targets -> student)
    Look at a cache:               inspect, merge
    Judge a student:               evaluate, plot
    """


def _register() -> None:
    from storage.commands import inspect_cmd, merge_cmd
    from student.commands import init_student_cmd, plot_cmd, train_student_cmd
    from student.evaluation.command import evaluate_cmd
    from teachers.commands import precompute_cmd

    for cmd in (precompute_cmd, init_student_cmd, train_student_cmd, inspect_cmd, merge_cmd, evaluate_cmd, plot_cmd):
        main.add_command(cmd)


_register()

if __name__ == "__main__":
    sys.exit(main())
