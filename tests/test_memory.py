"""The free memory ``reorth="auto"`` budgets with: the device's own on accelerators, the
host's on CPUs, and a warning where a GPU's memory cannot be read."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from specdens import _memory

HOST = 123_456_789  # what host_available_bytes says in these tests


@pytest.fixture
def host(monkeypatch):
    monkeypatch.setattr(_memory, "host_available_bytes", lambda: HOST)


class _Accelerator:
    """Stands in for a JAX GPU device (no GPU here): its platform and ``memory_stats()``."""

    platform = "gpu"

    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats

    def __str__(self):
        return "cuda:0"


class _Sharding:
    """Stands in for a JAX sharding over several such devices."""

    def __init__(self, devices, replicated):
        self.device_set = set(devices)
        self.is_fully_replicated = replicated


def test_numpy_and_jax_cpu_devices_use_host_memory(host):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    assert _memory.available_bytes(np, "cpu") == HOST
    x = jnp.ones(3)
    cpu = jax.devices("cpu")[0]
    assert cpu.memory_stats() is None  # what a CPU device gives: no allocator statistics
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # host memory is right for a CPU: no warning
        assert _memory.available_bytes(jnp, cpu) == HOST
        assert _memory.available_bytes(jnp, SingleDeviceSharding(cpu)) == HOST
        assert _memory.available_bytes(jnp, x.device) == HOST
        assert _memory.available_bytes(jnp, "cpu") == HOST


def test_jax_gpu_budgets_with_the_devices_allocator(host):
    pytest.importorskip("jax")
    import jax.numpy as jnp

    gpu = _Accelerator({"bytes_limit": 80 * 2**30, "bytes_in_use": 30 * 2**30})
    assert _memory.available_bytes(jnp, gpu) == 50 * 2**30
    other = _Accelerator({"bytes_limit": 80 * 2**30, "bytes_in_use": 40 * 2**30})
    # sharded: a share on each device; replicated: a whole copy on each
    assert _memory.available_bytes(jnp, _Sharding([gpu, other], False)) == 80 * 2**30
    assert _memory.available_bytes(jnp, _Sharding([gpu, other], True)) == 40 * 2**30


def test_a_gpu_without_statistics_falls_back_to_the_host_with_a_warning(host):
    pytest.importorskip("jax")
    import jax.numpy as jnp

    with pytest.warns(RuntimeWarning, match="host's available memory"):
        assert _memory.available_bytes(jnp, _Accelerator(None)) == HOST


def test_tensorflow_devices(host):
    tf = pytest.importorskip("tensorflow")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _memory.available_bytes(tf, "/job:localhost/replica:0/task:0/device:CPU:0") \
            == HOST
    assert _memory._tf_gpu("/job:localhost/replica:0/task:0/device:GPU:1") == "GPU:1"
    assert _memory._tf_gpu("/physical_device:GPU:0") == "GPU:0"
    assert _memory._tf_gpu("gpu:2") == "GPU:2"
    assert _memory._tf_gpu("/device:CPU:0") is None
    if not tf.config.list_physical_devices("GPU"):
        # a GPU device string where TensorFlow has none: it cannot say, and says so
        with pytest.warns(RuntimeWarning, match="GPU:0"):
            assert _memory.available_bytes(
                tf, "/job:localhost/replica:0/task:0/device:GPU:0") == HOST
