"""IOC runners: one per way of running an IOC (a Linux container, an emulator), one interface."""

from .base import IocRunner, free_port

__all__ = ["IocRunner", "free_port"]
