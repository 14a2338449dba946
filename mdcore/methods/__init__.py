"""Domain-generalization methods as a registry (the DomainBed pattern).

Every method is a class with ERM as its parent; it overrides only the hooks it needs. Methods compose
with ``+`` where they can (``multidomain+randconv+swad``): the composite is a class built from the
named ones, so each hook runs every component's version in turn.

    create_method("randconv+swad", {"randconv_p": 0.5})
    list_methods()  # coral, distill, erm, groupdro, linedraw, mixstyle, mmd, multidomain, randconv, reweight, supcon, swad
"""
from mdcore.methods.base import ERM, Batch, Method, create_method, list_methods, method_class, register_method
from mdcore.methods import (alignment, distill, groupdro, linedraw, mixstyle, multidomain, randconv,  # noqa: F401
                            supcon, swad)  # (imported to register them)

__all__ = ["ERM", "Batch", "Method", "create_method", "list_methods", "method_class", "register_method"]
