"""Names the stack derives from the stack name, and the rules of the names GCP and Kubernetes accept.

Every name a stack creates carries the stack (`stack_scoped_name`), so two stacks never collide;
a name key left empty (the "" sentinel of the key table) takes the derived name below.
"""

from __future__ import annotations

import hashlib
import re

CLUSTER_NAME_LIMIT = 40  # GKE cluster names: 1-40 characters
NODE_POOL_NAME_LIMIT = 40  # GKE node pool names: 1-40 characters
SERVICE_ACCOUNT_ID_LIMIT = 30  # IAM service account ids: 6-30 characters
BUCKET_NAME_LIMIT = 63  # Cloud Storage bucket names: 3-63 characters, globally unique
DNS_LABEL_LIMIT = 63  # namespaces, label values, Artifact Registry repository ids
APP_NAME_LIMIT = 40  # LWS pod names are <app>-<group>-<index>, and pod hostnames must stay labels
NAME_HASH_DIGITS = 6  # hex digits of the stack name's hash that keep cut names apart (16.7M values)
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9_-]{1,61}[a-z0-9]$")


def stack_scoped_name(prefix: str, stack: str, limit: int) -> str:
    """`<prefix>-<stack>` as a lowercase DNS label of at most `limit` characters, one per stack.

    Characters outside [a-z0-9-] become '-'. When that changed the stack name, or the name is
    too long (then as much of the stack as fits is kept), NAME_HASH_DIGITS hex digits of the stack
    name's SHA-256 end the name, so stacks whose names differ only in case, punctuation or their tail
    still get different names.
    """
    slug = re.sub(r"[^a-z0-9-]+", "-", stack.lower()).strip("-")
    name = f"{prefix}-{slug}".rstrip("-")
    if slug == stack and len(name) <= limit:
        return name
    digest = hashlib.sha256(stack.encode()).hexdigest()[:NAME_HASH_DIGITS]
    return f"{name[: limit - len(digest) - 1].rstrip('-')}-{digest}"


def region_of(zone: str) -> str:
    """The region of a GCP zone: us-east5-b -> us-east5."""
    return zone.rsplit("-", 1)[0]


def node_service_account_id(stack: str) -> str:
    """The least-privilege GSA a stack's node pools run as (6-30 characters), one per stack: a
    role=all or platform stack's for the cluster's pools, a serving stack's for its own TPU pools
    (whose Pathways pods act as it, so stacks never share bucket grants)."""
    return stack_scoped_name("js-nodes", stack, SERVICE_ACCOUNT_ID_LIMIT)


def is_dns_label(name: str, limit: int) -> bool:
    """A DNS-1123 label (lowercase letters, digits, '-', starting with a letter) of at most `limit` characters."""
    return bool(_DNS_LABEL.match(name)) and len(name) <= limit


def is_bucket_name(name: str) -> bool:
    """A Cloud Storage bucket name without dots (3-63 characters) that does not contain "goog"."""
    return bool(_BUCKET.match(name)) and "goog" not in name


def default_cluster_name(stack: str) -> str:
    """clusterName left empty."""
    return stack_scoped_name("jetstream", stack, CLUSTER_NAME_LIMIT)


def default_namespace(stack: str) -> str:
    """namespace left empty."""
    return stack_scoped_name("jetstream", stack, DNS_LABEL_LIMIT)


def default_scratch_bucket(project: str, stack: str) -> str:
    """scratchBucketName left empty: <gcp project>-scratch-<stack>."""
    return stack_scoped_name(f"{project}-scratch", stack, BUCKET_NAME_LIMIT)


def proxy_subnet_name(stack: str) -> str:
    """The proxy-only subnet a stack that creates its cluster creates for regional gateways."""
    return stack_scoped_name("jetstream-proxy", stack, DNS_LABEL_LIMIT)
