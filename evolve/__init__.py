"""mergekit-evolve: search merge recipes with CMA-ES, scoring candidates merged in memory.

    genome YAML ─► evolve.genome   (vector ⇄ merge config; the engine's own config is the phenotype)
                   evolve.search   (CMA-ES ask/tell, checkpoint + history, resume)
                   evolve.workers  (Ray actors: merge in place, score with lm-eval)
                   evolve.fitness  (lm-eval on a live model)   evolve.tasks (finding task YAMLs)
                   evolve.report   (best config, plots, HTML, best model)   evolve.tracking (W&B)

Heavy libraries (torch, ray, lm-eval, wandb, cma, matplotlib) are imported inside the functions that
need them so `mergekit-evolve --help` answers at once.
"""
