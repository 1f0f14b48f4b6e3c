"""Generative stories, one file per variant (installed as ``ppl_cluster.models``)."""
