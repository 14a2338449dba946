"""The multi-domain model and its parts: timm backbone, adapters, domain batch-norm, MoE head, input normalization, losses."""
