"""What every ``nerveseg`` command module shares: options, exit codes and the failure exit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ProjectOpt = Annotated[Path, typer.Option("--project", "-C", help="Project folder (holds params.yaml).")]
ParamsOpt = Annotated[str, typer.Option("--params", help="Settings file, relative to the project folder.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON on stdout.")]

EXIT_FAILED = 1  # the job failed
EXIT_USAGE = 2   # bad usage or settings
EXIT_PARTIAL = 3  # some inputs failed, the others were done (predict: unreadable frames listed, the rest written)


def fail(message: str, code: int = EXIT_FAILED) -> None:
    """Print ``error: message`` (credentials redacted) in red on stderr and exit with ``code``."""
    from pipeline.credentials import redact

    typer.secho(f"error: {redact(message)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
