"""``python -m dogbreed COMMAND ...``: the ``dogbreed`` command (see :mod:`dogbreed.cli`)."""

from dogbreed.cli import main

if __name__ == "__main__":
    main()
