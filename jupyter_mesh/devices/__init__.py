"""Device detection on workers: kinds, backends, models, memory and profiles."""

from ._detect import DeviceInfo, cuda_available, cuda_devices, tpu_devices
from ._profile import KNOWN_ACCELERATORS, Profile, lookup_known
from ._worker_plugin import METADATA_KEY, MeshWorkerPlugin

__all__ = [
    "KNOWN_ACCELERATORS",
    "METADATA_KEY",
    "DeviceInfo",
    "MeshWorkerPlugin",
    "Profile",
    "cuda_available",
    "cuda_devices",
    "lookup_known",
    "tpu_devices",
]
