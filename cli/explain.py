"""``minicnn explain``: the built-in demo that reproduces the question and answers it."""
import sys

import click

from minicnn.ops import DEVICES

from .options import EXIT_INTERRUPTED, EXIT_TERMINATED


@click.command("explain")
@click.option("--out", type=click.Path(file_okay=False), default="runs/explain", show_default=True,
              help="Directory for the four runs, explain.png and explain.txt (re-running resumes).")
@click.option("--quick", is_flag=True, help="A reduced size (fewer samples and steps), about a minute or two.")
@click.option("--workers", type=click.IntRange(1), default=None, help="Parallel runs (default: one per core).")
@click.option("--rerun", is_flag=True, help="Run every case again even when its run directory is complete.")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
              help="Where the cases train (the diagnosis is the same).")
def explain_command(out, quick, workers, rerun, device):
    """Why does lr = 0.1 train one network, throw another around, and collapse a third?

    Trains three networks with plain SGD at a constant lr = 0.1 on the built-in data -- one stable,
    one that jumps around and never learns, one that learns and then rises onto a plateau (a chance
    event: five seeds of it, the first that collapsed after learning is shown) -- plus one started
    on the plateau at lr = 1e-4, then prints the diagnosis and mechanism of each, with
    lr x lambda_max against 2, and draws their curves.

    \b
    Example:
      minicnn explain            # under a minute on 2 cores
      minicnn explain --quick
    """
    from minicnn.explain import explain

    state = {"bar": None}

    def on_start(to_run, skipped):
        if skipped:
            click.echo(f"resuming: {skipped} of {skipped + to_run} runs already done in {out}")
        if to_run:
            state["bar"] = click.progressbar(length=to_run, label="training the cases", file=sys.stderr,
                                             show_pos=True)
            state["bar"].__enter__()

    def on_result(row, done, to_run):
        if state["bar"] is not None:
            state["bar"].update(1)

    try:
        result = explain(out, quick=quick, workers=workers, rerun=rerun, on_start=on_start, on_result=on_result,
                         device=device)
    finally:
        if state["bar"] is not None:
            state["bar"].__exit__(None, None, None)
    click.echo(result.text)
    if result.interrupted:
        sys.exit(EXIT_TERMINATED if result.interrupted == "SIGTERM" else EXIT_INTERRUPTED)
    if not result.all_match:
        click.echo("note: not every run reproduced its expected picture (marked above)", err=True)
