"""``dogbreed COMMAND ...``: one command in front of the per-job entry points.

Each subcommand hands the rest of the command line to the job's own ``main`` (the same function the
``dogbreed-*`` scripts and ``python -m`` forms run), so its flags and Hydra overrides are unchanged:
``dogbreed train experiment=demo`` is ``dogbreed-train experiment=demo``. The table below is all this module
holds; the jobs are imported only once chosen, so ``dogbreed --help`` answers without importing torch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import import_module
from typing import NamedTuple


class Command(NamedTuple):
    """A subcommand: where its ``main`` lives, and the one line ``dogbreed --help`` shows for it."""

    target: str  # "module:function"
    summary: str


COMMANDS: dict[str, Command] = {
    "train": Command("dogbreed.train:main", "train, test and export a model (Hydra overrides: experiment=demo ...)"),
    "tune": Command("dogbreed.tune:main", "search hyperparameters with Optuna around train (needs the tune extra)"),
    "data": Command("dogbreed.data.__main__:main", "stage, check or upload a dataset (stage | check | upload)"),
    "report": Command("dogbreed.report.__main__:main", "rebuild the HTML report of a training or tuning run dir"),
    "package": Command("dogbreed.serve.package:main", "build model.tar.gz from a run dir, with optional exports"),
    "serve": Command("dogbreed.serve.__main__:main", "serve a model over HTTP, with a web page (needs serve)"),
    "predict": Command("dogbreed.predict:main", "classify a folder, list or s3:// prefix into CSV or JSONL"),
    "sagemaker": Command(
        "dogbreed.sagemaker.__main__:main", "SageMaker jobs: train | tune | deploy | transform | analytics"
    ),
}


def usage() -> str:
    """The text of ``dogbreed --help``: each subcommand with its one line."""
    width = max(map(len, COMMANDS))
    lines = "\n".join(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items())
    return (
        "usage: dogbreed COMMAND [ARGS...]\n\n"
        f"commands:\n{lines}\n\n"
        "`dogbreed COMMAND --help` shows a command's own options; `dogbreed-COMMAND` and "
        "`python -m dogbreed.COMMAND` run the same code."
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Dispatch ``dogbreed COMMAND ARGS`` to the command's ``main`` with ``ARGS`` as its command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        sys.exit(0 if args else 2)
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(
            f"dogbreed: unknown command {name!r}; choose one of {', '.join(COMMANDS)} (dogbreed --help)",
            file=sys.stderr,
        )
        sys.exit(2)
    module, function = COMMANDS[name].target.split(":")
    # the jobs' mains read sys.argv (Hydra's entry points can only), so the subcommand's words become argv
    sys.argv = [f"dogbreed {name}", *rest]
    result = getattr(import_module(module), function)()
    sys.exit(result if isinstance(result, int) else 0)
