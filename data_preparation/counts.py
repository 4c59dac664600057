"""Print and save the site x split x class counts table of a prepared data folder.

The successor of the Fed-X-ViT seed's count.py: it reads every site's dataset.json under
the data root and writes counts.json and counts.md beside them.
"""

import argparse
from pathlib import Path

from fedxvit.datalist import count_table, write_counts
from fedxvit.errors import ArgumentParser, FedXViTError, run_cli


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data", help="folder holding one sub-folder per site (default: data)")
    args = parser.parse_args(argv)
    root = Path(args.data)
    if not root.is_dir():
        raise FedXViTError(f"data folder {root} does not exist: run `make data` or the importer first")
    if not count_table(root):
        raise FedXViTError(f"no site folders with dataset.json under {root}")
    print(write_counts(root), end="")


if __name__ == "__main__":
    run_cli(main)
