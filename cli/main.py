"""The ``minicnn`` command line: a thin click layer over the library.

Every echo, exit code and error message lives in cli/; the library returns data and raises
``MinicnnError`` subclasses for bad input, which become one ``Error: ...`` line and exit code 1
(click's own usage errors exit 2). One module per command (train, inspect, debug, sweep, lrfind,
explain), each importing the shared options (cli/options.py); this module is the group.
"""
import click

from .debug import debug_command
from .explain import explain_command
from .inspect import inspect_command
from .lrfind import lr_find_command
from .sweep import sweep_command
from .train import train_command


class MinicnnGroup(click.Group):
    """A click group that turns library errors into one line on stderr and a non-zero exit."""

    def invoke(self, ctx):
        from minicnn.errors import MinicnnError
        try:
            return super().invoke(ctx)
        except MinicnnError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:         # a file that cannot be read or written: named, in one line
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or type(e).__name__}") from None


@click.group(cls=MinicnnGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                  "max_content_width": 100})
@click.version_option(package_name="minicnn")
def main():
    """minicnn: train small CNNs with plain SGD and see why training behaves as it does."""


for command in (train_command, inspect_command, debug_command, sweep_command, lr_find_command, explain_command):
    main.add_command(command)


if __name__ == "__main__":
    main()
