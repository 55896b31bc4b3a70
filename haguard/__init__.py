"""haguard: a high-availability watchdog for QEMU/KVM hosts."""

__version__ = "0.1.0"
