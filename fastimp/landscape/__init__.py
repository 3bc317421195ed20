"""Error landscape of IMP solutions (paper Section 3.1, Appendix B; Figs. 2, 3, 6).

- :func:`evaluate`: error and loss of K networks ``origin + sum_j coeffs[k, j] directions[j]``,
  chunk by chunk, one batched forward per chunk.
- :func:`error_barrier`, :func:`path_through`, :func:`barrier_matrix`: Definition 2.1 and Fig. 2.
- :func:`plane`, :func:`imp_step_plane`, :func:`pruning_plane`: 2-D slices (Figs. 3 and 6).
"""
from fastimp.landscape.barrier import (DEFAULT_BETAS, BarrierCurve, BarrierMatrix, PathResult,
                                       barrier_matrix, error_barrier, path_through)
from fastimp.landscape.evaluate import (Evaluation, auto_batching, evaluate, evaluate_loop,
                                        reset_bn_)
from fastimp.landscape.plane import (PlaneResult, gram_schmidt, imp_step_plane, plane, project,
                                     pruning_plane)
from fastimp.landscape.space import StateLayout

__all__ = ["evaluate", "evaluate_loop", "reset_bn_", "auto_batching", "Evaluation",
           "error_barrier", "BarrierCurve", "path_through", "PathResult", "barrier_matrix",
           "BarrierMatrix", "DEFAULT_BETAS", "plane", "imp_step_plane", "pruning_plane", "project",
           "PlaneResult", "gram_schmidt", "StateLayout"]
