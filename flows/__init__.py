"""Prefect flows over the mdpipe stages, and the ``mdpipe`` command line."""
