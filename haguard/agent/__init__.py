"""The agent runtime: owns the pure core (haguard.core.host), feeds it and executes its outputs."""
