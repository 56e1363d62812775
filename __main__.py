"""Pulumi entry point: JetStream on GKE TPU v6e slices, from a model and a topology.

Wiring only: read and validate the config (a bad one stops here, before any resource), build the
components, export the outputs. See components/resources/program.py and README.md.
"""

import pulumi

from components.resources import program

config, plan = program.load()
for name, value in program.build(config, plan).items():
    pulumi.export(name, value)
