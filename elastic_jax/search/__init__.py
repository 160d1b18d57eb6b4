"""Search algorithms on genomes (int32 choice-index vectors) and fitness arrays (minimised).

Pure JAX with fixed shapes, independent of the model: operators (sampling, mutation, crossover,
selection, duplicate rejection), NSGA-II, regularized evolution, the W-PCA GA, random-search
baselines, hypervolume, and a driver that runs a whole search as one compiled `lax.scan`.
"""

from elastic_jax.search.baselines import random_search, stratified_random_search
from elastic_jax.search.driver import STRATEGIES, SearchResult, default_n_children, run_evolution
from elastic_jax.search.evolution import evolution_step, ga_step, random_step
from elastic_jax.search.hypervolume import hypervolume_2d, hypervolume_nd, pareto_front_mask
from elastic_jax.search.nsga2 import (
    binary_tournament,
    crowding_distance,
    domination_matrix,
    non_dominated_rank,
    nsga2_order,
    nsga2_select,
    nsga2_step,
)
from elastic_jax.search.operators import (
    crossover,
    is_duplicate,
    mutate,
    random_genomes,
    sample_feasible,
    top_k_indices,
    tournament_select,
)
from elastic_jax.search.state import SearchState, init_state

__all__ = [
    "STRATEGIES",
    "SearchResult",
    "SearchState",
    "binary_tournament",
    "crossover",
    "crowding_distance",
    "default_n_children",
    "domination_matrix",
    "evolution_step",
    "ga_step",
    "hypervolume_2d",
    "hypervolume_nd",
    "init_state",
    "is_duplicate",
    "mutate",
    "non_dominated_rank",
    "nsga2_order",
    "nsga2_select",
    "nsga2_step",
    "pareto_front_mask",
    "random_genomes",
    "random_search",
    "random_step",
    "run_evolution",
    "sample_feasible",
    "stratified_random_search",
    "top_k_indices",
    "tournament_select",
]
