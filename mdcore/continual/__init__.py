"""Continual learning on the multi-domain model: new data and new domains join a trained model without
forgetting the old ones. Pure torch: GEM forgetting metrics, replay buffers, growing a model by a domain
(initialised from the nearest known one), few-shot and test-time adaptation of a new domain's parts."""
from mdcore.continual.grow import (add_domain, domain_part_names, interpolate_toward, nearest_domain, refit_prototypes,
                                   restore_domains, train_only_domain_parts)
from mdcore.continual.metrics import gem_metrics
from mdcore.continual.replay import REPLAY_STRATEGIES, mixed_batches, per_sample_losses, replay_budget, select_replay
from mdcore.continual.adapt import few_shot_mask, recompute_domain_norm

__all__ = ["add_domain", "domain_part_names", "interpolate_toward", "nearest_domain", "refit_prototypes", "restore_domains", "train_only_domain_parts",
           "gem_metrics", "REPLAY_STRATEGIES", "mixed_batches", "per_sample_losses", "replay_budget", "select_replay",
           "few_shot_mask", "recompute_domain_norm"]
