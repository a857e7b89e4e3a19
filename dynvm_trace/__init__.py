"""dynvm-trace: observability for page merging and free page reclaim on KVM hosts."""

__version__ = "0.1.0"
