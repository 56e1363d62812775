"""The `gateway` config keys, and their parsing into `gateway.GatewaySettings`.

The keys join the stack's key table (`config_table.CONFIG_KEYS`); `parse_gateway` reads only its
own two, plus what it is told of the stack: its server runtime and whether it creates its cluster.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from components.core.config_keys import ConfigKey, is_set, read_choice, read_text
from components.core.errors import ConfigError
from components.core.gateway import EXISTING_SUBNET, MODES, NONE, OFF, PROTOCOL_RUNTIMES, GatewaySettings

# One /23 is what Google's examples give the proxy-only subnet; outside the 10.128.0.0/9 block
# that auto-mode VPCs (the default network) carve their regional subnets from.
DEFAULT_PROXY_SUBNET_RANGE = "10.127.0.0/23"

CONFIG_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey(
        name="gateway",
        type="string",
        default=NONE,
        description="GKE Inference Gateway in front of the replicas: none (the Service only), internal (an "
        "internal regional Application Load Balancer, gke-l7-rilb) or external (a regional external one). Needs "
        "serverRuntime=bundled. On role=platform, any value but none prepares the cluster (proxy-only subnet, "
        "Gateway API, InferencePool CRD).",
    ),
    ConfigKey(
        name="gatewayProxySubnetRange",
        type="string",
        default=DEFAULT_PROXY_SUBNET_RANGE,
        description="With gateway on a cluster the stack creates: the CIDR range of the region's proxy-only "
        "subnet it creates (/26 or larger, free in the VPC); empty = the VPC already has one in the cluster's region.",
    ),
)
KEYS_BY_NAME = {key.name: key for key in CONFIG_KEYS}


def _mode(raw: Mapping[str, str]) -> str:
    suggestion = "pulumi config set gateway internal (reachable from the VPC) or none (the Service only)"
    return read_choice(raw, KEYS_BY_NAME["gateway"], MODES, suggestion)


def _proxy_subnet_range(raw: Mapping[str, str]) -> str:
    text = read_text(raw, KEYS_BY_NAME["gatewayProxySubnetRange"])
    if text == EXISTING_SUBNET:
        return text
    try:
        network = ipaddress.ip_network(text)
    except ValueError:
        network = None
    # Google requires a private IPv4 range of at least /26 for a proxy-only subnet.
    if network is None or network.version != 4 or network.prefixlen > 26 or not network.is_private:
        raise ConfigError(
            "gatewayProxySubnetRange",
            f"{text!r} is not a private IPv4 CIDR range of /26 or larger",
            f"pulumi config set gatewayProxySubnetRange {DEFAULT_PROXY_SUBNET_RANGE}, or empty if the VPC has one",
        )
    return str(network)


def parse_gateway(
    raw: Mapping[str, str], *, server_runtime: str | None, creates_cluster: bool = True
) -> GatewaySettings:
    """The gateway settings; `server_runtime` None for a platform stack (it serves nothing).

    A stack that serves needs a runtime of PROTOCOL_RUNTIMES. The subnet range is refused where it
    cannot be used: without a gateway (a forgotten `gateway`), and on a cluster the stack does not
    create (the subnet is that cluster owner's)."""
    if not creates_cluster and is_set(raw, KEYS_BY_NAME["gatewayProxySubnetRange"]):
        raise ConfigError(
            ("gatewayProxySubnetRange", "existingClusterName"),
            "is set, but the stack does not create its cluster: the proxy-only subnet is the cluster owner's",
            "remove gatewayProxySubnetRange; the VPC of the existing cluster needs a proxy-only subnet in its region",
        )
    mode = _mode(raw)
    if mode == NONE:
        if is_set(raw, KEYS_BY_NAME["gatewayProxySubnetRange"]):
            raise ConfigError(
                ("gatewayProxySubnetRange", "gateway"),
                "is set but gateway is none",
                "pulumi config set gateway internal, or remove gatewayProxySubnetRange",
            )
        return OFF
    if server_runtime is not None and server_runtime not in PROTOCOL_RUNTIMES:
        raise ConfigError(
            ("gateway", "serverRuntime"),
            f"serverRuntime={server_runtime} cannot sit behind GKE Inference Gateway: its endpoint picker routes "
            f"OpenAI API requests on metrics of the model-server protocol, and {server_runtime}'s HTTP front end "
            "serves /generate only and exports neither vllm:num_requests_waiting nor a KV-cache fraction",
            f"pulumi config set serverRuntime {' or '.join(PROTOCOL_RUNTIMES)}, or gateway none",
        )
    return GatewaySettings(mode=mode, proxy_subnet_range=_proxy_subnet_range(raw))
