"""One module per command, each a Typer app with one command; `cli.app` imports them by name when run."""
