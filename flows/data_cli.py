"""``nerveseg data ...``: the datasets (the embedded phantom, imports, versions)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(no_args_is_help=True, help="Datasets: the embedded phantom, imports and versions.")


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option("--out", help="Dataset folder; frames go to OUT/train.")],
    subjects: Annotated[int, typer.Option(min=1)] = 12,
    frames_per_subject: Annotated[int, typer.Option(min=1)] = 30,
    seed: int = 2016,
) -> None:
    """Write a synthetic ultrasound phantom in the competition's layout."""
    from pipeline.phantom import PhantomSpec, generate_phantom

    table = generate_phantom(out, PhantomSpec(subjects, frames_per_subject, seed), progress=True)
    typer.echo(f"wrote {len(table)} frames of {table.subject.nunique()} subjects to {out / 'train'} "
               f"({(~table.has_nerve).mean():.1%} without a nerve)")


