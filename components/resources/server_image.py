"""BundledServerImage: this repository's server image, built by the stack and pushed to its own
Artifact Registry repository (serverRuntime=bundled without bundledServerImage).

`pulumi_docker_build.Image` builds serving/Dockerfile from the repository root for the TPU hosts
(linux/amd64, JAX_EXTRA=tpu) and pushes it; its `digest` output changes only when the build
context or the build settings change, and the pods run `<repository>@<digest>`: a code change
rolls out, an unchanged tree gives an empty diff. Preview does not build (a multi-GB build per
`pulumi preview` would make every review slow); `pulumi up` does. The push authenticates with
the deploying identity's access token; the nodes pull with the node service account's
roles/artifactregistry.reader (identity.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import pulumi
import pulumi_docker_build as docker_build
import pulumi_gcp as gcp

REGISTRY_USER = "oauth2accesstoken"  # Artifact Registry: an OAuth access token as the password


@dataclasses.dataclass(frozen=True, kw_only=True)
class BundledServerImageArgs:
    project: str
    location: str  # the repository's region, next to the TPUs
    repository_id: str
    image: str  # <location>-docker.pkg.dev/<project>/<repository>/<name>
    tag: str
    context: str  # the build context directory (the repository root)
    dockerfile: str
    build_args: Mapping[str, str]
    platform: str


class BundledServerImage(pulumi.ComponentResource):
    ref: pulumi.Output[str]  # <image>@sha256:<digest>: what the LeaderWorkerSet runs

    def __init__(self, name: str, args: BundledServerImageArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("jetstream:images:BundledServerImage", name, None, opts)
        repository = gcp.artifactregistry.Repository(
            f"{name}-repository",
            gcp.artifactregistry.RepositoryArgs(
                repository_id=args.repository_id,
                location=args.location,
                project=args.project,
                format="DOCKER",
                description="This repository's JetStream-compatible server, built by the stack",
            ),
            opts=pulumi.ResourceOptions(parent=self),
        )
        token = gcp.organizations.get_client_config_output(opts=pulumi.InvokeOptions(parent=self)).access_token
        image = docker_build.Image(
            f"{name}-image",
            docker_build.ImageArgs(
                context=docker_build.BuildContextArgs(location=args.context),
                dockerfile=docker_build.DockerfileArgs(location=args.dockerfile),
                build_args=dict(args.build_args),
                platforms=[docker_build.Platform(args.platform)],
                tags=[f"{args.image}:{args.tag}"],
                push=True,
                build_on_preview=False,
                registries=[
                    docker_build.RegistryArgs(
                        address=args.image.split("/", 1)[0],
                        username=REGISTRY_USER,
                        password=pulumi.Output.secret(token),
                    )
                ],
            ),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[repository]),
        )
        self.ref = pulumi.Output.concat(args.image, "@", image.digest)
        self.register_outputs({"ref": self.ref})
