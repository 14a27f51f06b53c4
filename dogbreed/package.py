"""``python -m dogbreed.package RUN_DIR -o model.tar.gz``: build the SageMaker model archive.

A thin entry point; the work is in :mod:`dogbreed.serve.package`.
"""

from dogbreed.serve.package import main

if __name__ == "__main__":
    main()
