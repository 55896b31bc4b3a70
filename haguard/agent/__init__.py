"""The agent runtime: owns the pure core (haguard.core.node), feeds it and executes its outputs."""
