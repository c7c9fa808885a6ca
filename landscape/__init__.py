"""Loss-landscape analyses of sparse networks: connectivity barriers, Hessian sharpness,
sign flips, mask overlap and training dynamics, stored as xarray datasets."""

from sparse_training import __version__  # noqa: F401  - one version for the whole package
