"""The paper's analyses of an IMP run folder, one module each: a function that takes a
:class:`fastimp.imp.Run`, writes its results under ``run.dir/analysis`` (names in
:mod:`fastimp.analysis.paths`) and returns them.

=====================  ==========================================  =================
module                 function                                    figure
=====================  ==========================================  =================
``barriers``           ``barrier_analysis(run, ...)``              Fig. 2
``planes``             ``plane_analysis(run, level, kind, ...)``   Figs. 3, 6
``robustness``         ``robustness_analysis(run, ...)``           Fig. 4
``hessian``            ``hessian_analysis(run, level, ...)``       Fig. 5 (theory)
``prune_scan``         ``prune_scan_analysis(run, level, ...)``    Fig. 5 (points)
``weights``            ``weights_analysis(run, ...)``              Figs. 7, 9
``lrr_rewound``        ``lrr_rewound_analysis(run, ...)``          Fig. 8
``compare``            ``compare(runs, png)``                      Fig. 10
``paper``              ``paper_analysis(run, levels, quick)``      all of them
=====================  ==========================================  =================

Every analysis aggregates all replicates (mean ± std) and is resumable; ``branches`` holds the
retrainings of a level with another strategy that Figs. 7-9 share.
"""
from fastimp.analysis.barriers import barrier_analysis
from fastimp.analysis.hessian import hessian_analysis
from fastimp.analysis.lrr_rewound import lrr_rewound_analysis
from fastimp.analysis.paper import paper_analysis
from fastimp.analysis.planes import plane_analysis
from fastimp.analysis.prune_scan import prune_scan_analysis
from fastimp.analysis.robustness import robustness_analysis
from fastimp.analysis.weights import weights_analysis

__all__ = ["barrier_analysis", "plane_analysis", "robustness_analysis", "hessian_analysis",
           "prune_scan_analysis", "weights_analysis", "lrr_rewound_analysis", "paper_analysis"]
