"""The sans-IO core: pure, deterministic decision code.

Nothing here reads a clock, sleeps, touches a socket or keeps global state: facts
and the current time come in as arguments, decisions go out as return values.
"""
