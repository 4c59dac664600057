"""User-facing errors and the CLI wrapper that prints them as one line.

Anything raised as `FedXViTError` is a problem with the user's input (a path, a site, an
option) and its message already names it; CLIs print it and exit 2 instead of a traceback.
"""

import sys
from typing import Callable


class FedXViTError(Exception):
    """A problem with user input whose message names the file, site or option at fault."""


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
