"""The jetstream-tpu guardrails, run by `pulumi preview|up --policy-pack policy`.

Pulumi runs this directory's `__main__.py` in the pack's own virtualenv (PulumiPolicy.yaml), with
the directory on sys.path. Constructing the PolicyPack serves it to the engine until Pulumi stops it.
"""

from policies import PACK_NAME, POLICIES
from pulumi_policy import PolicyPack

PolicyPack(name=PACK_NAME, policies=POLICIES)
