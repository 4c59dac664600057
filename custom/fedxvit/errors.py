"""User-facing errors and the CLI wrapper that prints them as one line.

Anything raised as `FedXViTError` is a problem with the user's input (a path, a site, an
option) and its message already names it; CLIs print it and exit 2 instead of a traceback.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Callable


class FedXViTError(Exception):
    """A problem with user input whose message names the file, site or option at fault."""


def read_json(path, missing: str) -> object:
    """The parsed JSON file at `path`; `missing` is the one-line error when it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise FedXViTError(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FedXViTError(f"{path} is not valid JSON: {exc}") from None


def run_cli(main: Callable[[], object]) -> None:
    """Run a CLI entry point, turning FedXViTError into `error: <message>` and exit code 2."""
    try:
        main()
    except FedXViTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad option is one line naming it (argparse prints its whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
