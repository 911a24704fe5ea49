"""The `lowrank` command line (`app.py`), one module per command under `commands/`, Rich rendering."""
