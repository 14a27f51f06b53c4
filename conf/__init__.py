"""dogbreed's Hydra configs; the build installs this folder as the ``dogbreed.conf`` package."""
