"""Suite-wide set-up that must happen before JAX is imported anywhere.

Eight virtual CPU devices let the sharding, disaggregation and int8 tests build real multi-axis
meshes on a laptop or CI box. Single-device tests ask for a one-device mesh explicitly.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
