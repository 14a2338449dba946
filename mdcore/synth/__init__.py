"""Synthetic data and augmentation: Fourier style transfer, the synthesis policy, realism scores, training views."""
