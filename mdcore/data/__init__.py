"""Data: built-in datasets, the manifest, image decoding (in memory or on demand), checks, sampling, atomic I/O."""
