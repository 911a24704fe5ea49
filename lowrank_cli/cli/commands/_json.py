"""`--json` output: one JSON object on stdout and nothing else."""

from __future__ import annotations

import json
import sys


def print_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
