"""The cluster decision core: quorum, terms, committed state, ownership, fencing, placement.

Pure and deterministic (see docs/cluster-design.md).  `ClusterMember` composes the parts
for one host; the agent runtime and the simulator (`haguard.sim`) drive the same code.
"""
