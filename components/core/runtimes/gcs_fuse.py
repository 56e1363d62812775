"""Cloud Storage buckets as pod volumes through GKE's Cloud Storage FUSE CSI driver.

GKE's documented way to serve weights from a bucket: the driver injects a sidecar into a pod
annotated `gke-gcsfuse/volumes: "true"`, which mounts the bucket as the pod's Kubernetes service
account (Workload Identity). The options are those of GKE's vLLM-on-TPU tutorial (parallel downloads
into an unbounded file cache, for large weight files); its file cache is the memory-backed volume
CACHE_VOLUME. The cluster needs the driver enabled (GKE add-on GcsFuseCsiDriver).
"""

from __future__ import annotations

from components.core import lws_model as lws

DRIVER = "gcsfuse.csi.storage.gke.io"
GCS_SCHEME = "gs://"
MOUNT_OPTIONS = (
    "implicit-dirs,file-cache:enable-parallel-downloads:true,file-cache:parallel-downloads-per-file:100,"
    "file-cache:max-parallel-downloads:-1,file-cache:download-chunk-size-mb:10,file-cache:max-size-mb:-1"
)
# The sidecar injection, and no limits for the sidecar: it caches whole weight files.
ANNOTATIONS = {
    "gke-gcsfuse/volumes": "true",
    "gke-gcsfuse/cpu-limit": "0",
    "gke-gcsfuse/memory-limit": "0",
    "gke-gcsfuse/ephemeral-storage-limit": "0",
}
# A volume of this name replaces the sidecar's default file cache (an emptyDir on the boot disk).
CACHE_VOLUME = "gke-gcsfuse-cache"


def bucket_and_directory(uri: str) -> tuple[str, str]:
    """gs://bucket/a/b -> ("bucket", "a/b"); gs://bucket -> ("bucket", "")."""
    bucket, _, directory = uri.removeprefix(GCS_SCHEME).partition("/")
    return bucket, directory.strip("/")


def bucket_volume(name: str, bucket: str, directory: str = "", read_only: bool = False) -> lws.Volume:
    """The bucket (only `directory` of it, when given) as a volume."""
    options = f"{MOUNT_OPTIONS},only-dir={directory}" if directory else MOUNT_OPTIONS
    source = lws.CSIVolumeSource(
        driver=DRIVER, read_only=read_only or None, volume_attributes={"bucketName": bucket, "mountOptions": options}
    )
    return lws.Volume(name=name, csi=source)


def cache_volume() -> lws.Volume:
    return lws.Volume(name=CACHE_VOLUME, empty_dir=lws.EmptyDirVolumeSource(medium="Memory"))
