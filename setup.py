"""The wheel's packages, found rather than listed: every package under ``dogbreed/``, and ``dogbreed.conf``.

Everything else is in ``pyproject.toml``. A hand-kept list in ``[tool.setuptools] packages`` shipped a wheel
without ``dogbreed.rules``; ``packages.find`` alone cannot add ``dogbreed.conf``, whose files live in the
top-level ``conf/`` (``package-dir`` maps it).
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["dogbreed", "dogbreed.*"]), "dogbreed.conf"])
