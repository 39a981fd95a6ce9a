"""pytest-epics-multiarch: test EPICS IOC images across targets."""

__version__ = "0.1.0"
