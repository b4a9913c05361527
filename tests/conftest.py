"""Test-wide setup: 8 simulated CPU devices so mesh tests run in-process,
and one persistent XLA compilation cache for the session's processes (the
same small models compile in many tests: ~25% of the suite's time)."""

import os
import tempfile
# pytest's unraisable-exception hook imports tracemalloc lazily; once TFDS's
# etils lazy-import shims are live that import can fail ("'LazyModule' object
# is not callable") and turn a harmless GC warning into a test failure.
import tracemalloc  # noqa: F401

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Inherited by both pytest-xdist workers, notebook kernels and subprocesses.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"dpjax-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 2**30))

# Minutes-long tests start first, so that under `pytest -n 2` the two
# workers do not end on one long test while the other idles.
_FIRST = ("tests/paper_test.py::test_paper_presets_execute",
          "tests/notebooks_test.py::test_notebook_runs[03",
          "tests/notebooks_test.py::test_notebook_runs[02",
          "tests/train/multiprocess_test.py", "tests/paper_test.py",
          "tests/notebooks_test.py", "tests/train/resume_test.py",
          "tests/train/preemption_test.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = lambda item: next(
      (i for i, f in enumerate(_FIRST) if item.nodeid.startswith(f)),
      len(_FIRST))
  items.sort(key=rank)  # Stable: the rest keep their order.
