"""Compartmentalised diffusion models (CDM, Golatkar et al. 2024): one private compartment per data shard on a
shared public base (or a diffusers pipeline: pipeline_base.py), composed at sampling as the exact mixture, served by
access rights, forgotten by dropping.

    python -m dpldm.compartments train|add|sample|forget|attribute|evaluate --help
"""
