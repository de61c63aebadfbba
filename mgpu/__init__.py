"""mgpumanager: one daemon in front of the local GPU inference services."""

__version__ = "0.1.0"
