"""Write the model tables of README.md and pretrained_models/README.md from the released models'
``pretrained_models/*.results.json`` and ``pretrained_models/authors_release.json`` (see
:mod:`mdeq.analysis.model_zoo`):

    python tools/model_zoo.py            # rewrite the tables between their marker comments
    python tools/model_zoo.py --check    # only compare: exit 2 naming the pages that differ

Exit status: 0 done (or, with ``--check``, the pages agree); 2 a results.json that lacks a field, a
page without its markers, or with ``--check`` a page that differs (one-line message).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence

from mdeq.analysis.model_zoo import ZooError, stale_pages, write_pages
from mdeq.programs.cli import tool_main

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare the pages with the tables, write nothing")
    p.add_argument("--repo", default=str(REPO), help="the repository whose pages to write (default: this one)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Write (or with ``--check`` compare) the model tables of the repository of ``argv``."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    repo = Path(args.repo)
    if args.check:
        stale = stale_pages(repo)
        if stale:
            raise ZooError(f"{', '.join(str(p.relative_to(repo)) for p in stale)} differ from the results: "
                           "run python tools/model_zoo.py")
        logging.info("the model tables agree with the results")
        return
    changed = write_pages(repo)
    logging.info("wrote %s", ", ".join(str(p.relative_to(repo)) for p in changed) if changed else "nothing: the "
                 "tables agree with the results")


if __name__ == "__main__":
    tool_main(main)
