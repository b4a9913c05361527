"""Test-wide setup: 8 simulated CPU devices so mesh tests run in-process."""

import os
# pytest's unraisable-exception hook imports tracemalloc lazily; once TFDS's
# etils lazy-import shims are live that import can fail ("'LazyModule' object
# is not callable") and turn a harmless GC warning into a test failure.
import tracemalloc  # noqa: F401

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
