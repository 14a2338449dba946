"""mdcore: the multi-domain transfer library behind mdpipe (pure Python + torch/timm).

It imports neither Prefect, Ray nor DVC, so every piece can be unit-tested on its own.
"""
