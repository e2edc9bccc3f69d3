"""Floor 8: the side-by-side experiment (``compare``), its fair protocol, its method registry,
and the longer studies (rank, low data, memory across scales)."""
from .side_by_side import (CompareConfig, CompareResults, MethodSummary, RunResult, base_model, compare,
                           config_for, format_table, run_method)
from .methods import DEFAULT_METHODS, METHODS, Method
from .protocol import LrChoice, Spread, aggregate, choose_lr, steps_to_reach
from .studies import (LOWDATA_EXAMPLES, RANKS, format_memory, lowdata, memory_study, project,
                      rank_study)

__all__ = ["CompareConfig", "CompareResults", "DEFAULT_METHODS", "LOWDATA_EXAMPLES", "LrChoice", "METHODS", "Method",
           "MethodSummary", "RANKS", "RunResult", "Spread", "aggregate", "base_model", "choose_lr",
           "compare", "config_for", "format_memory", "format_table", "lowdata", "memory_study", "project",
           "rank_study", "run_method", "steps_to_reach"]
