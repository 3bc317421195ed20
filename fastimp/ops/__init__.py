"""One module per op: a PyTorch reference plus backends, registered with :mod:`fastimp._backend`."""
from fastimp.ops import magnitude_threshold, masked_sgd, weight_points  # noqa: F401
