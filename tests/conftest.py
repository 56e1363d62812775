"""Suite-wide set-up that must happen before JAX is imported anywhere.

Eight virtual CPU devices let the sharding, disaggregation and int8 tests build real multi-axis
meshes on a laptop or CI box. Single-device tests ask for a one-device mesh explicitly. The device
count is appended to whatever XLA_FLAGS the user set (a later flag wins in XLA), so other XLA
flags never silently drop the multi-device tests.
"""

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_COUNT_FLAG}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
