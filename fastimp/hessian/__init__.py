"""The Hessian of the train loss restricted to a mask's axial subspace: Hessian-vector products
(forward-over-reverse or double backward), top eigenvalues (Lanczos), trace (Hutchinson) and the
spectral density (stochastic Lanczos quadrature). Section 3.3 and Appendix B of the paper."""
from fastimp.hessian.core import Hessian
from fastimp.hessian.density import SpectralDensity
from fastimp.hessian.hvp import HVPOperator
from fastimp.hessian.lanczos import LanczosResult, lanczos

__all__ = ["Hessian", "HVPOperator", "SpectralDensity", "LanczosResult", "lanczos"]
