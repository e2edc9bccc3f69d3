"""Floor 8: the side-by-side experiment (``compare``), its fair protocol, its method registry,
its bases, the runner that spreads its runs over the cores, and the longer studies (rank, low
data, forgetting, variance, memory across scales, budget)."""
from .bases import base_dir, base_model
from .methods import DEFAULT_METHODS, METHODS, Method
from .protocol import LrChoice, Spread, Verdict, aggregate, choose_lr, paired_verdict, steps_to_reach
from .report import format_table
from .side_by_side import (CompareConfig, CompareResults, MethodSummary, RunResult, compare, config_for,
                           fine_tune, run_experiment, run_experiments)
from .memory_study import format_memory, memory_study, project
from .studies import (FORGETTING_TARGET, LOWDATA_EXAMPLES, RANKS, forgetting_study, format_retention,
                      format_variance, lowdata, rank_study, variance_study)

__all__ = ["CompareConfig", "CompareResults", "DEFAULT_METHODS", "FORGETTING_TARGET", "LOWDATA_EXAMPLES", "LrChoice",
           "METHODS", "Method", "MethodSummary", "RANKS", "RunResult", "Spread", "Verdict", "aggregate", "base_dir", "base_model",
           "choose_lr", "compare", "config_for", "fine_tune", "forgetting_study", "format_memory", "format_retention",
           "format_table", "format_variance", "lowdata", "memory_study", "paired_verdict", "project", "rank_study",
           "run_experiment", "run_experiments", "steps_to_reach", "variance_study"]
