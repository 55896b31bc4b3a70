"""The migration core: one async API that moves a running QEMU VM live.

`engine.run_migration` drives two QMP monitors through preflight, configuration,
the move itself (with convergence decisions from `haguard.core.strategy`),
verification and failure handling.  `managed.migrate_vm` wraps it for VMs
defined in haguard's inventory (it starts and cleans up the destination QEMU).
"""
