"""Amortized posteriors, one file per variant (installed as ``ppl_cluster.guides``)."""
