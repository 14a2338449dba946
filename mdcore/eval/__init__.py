"""Scoring: accuracy per domain, the leave-one-domain-out protocol's rows and table, the promotion decision, linear probes."""
