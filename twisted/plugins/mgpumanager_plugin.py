"""Makes ``twistd mgpumanager`` known to twistd's plugin discovery."""

from twisted.application.service import ServiceMaker

mgpumanager = ServiceMaker(
    "mgpumanager",
    "mgpu.tap",
    "GPU inference control plane: facade, GPU lock, health, status",
    "mgpumanager",
)
