"""Iterative Magnitude Pruning (Algorithm 1 of the paper) with weight rewinding (IMP-WR), learning
rate rewinding (IMP-LRR) and finetuning (IMP-FT); run folders that other analyses read."""
from fastimp.imp.config import IMPConfig, apply_overrides
from fastimp.imp.folder import Run, load_run
from fastimp.imp.matching import dense_epsilon, is_matching, summarize
from fastimp.imp.runner import projection_distance, run
from fastimp.imp.strategies import LevelPlan, level_plan

__all__ = ["IMPConfig", "Run", "run", "load_run", "level_plan", "LevelPlan", "apply_overrides",
           "dense_epsilon", "is_matching", "summarize", "projection_distance"]
