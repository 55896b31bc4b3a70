"""The `haguard` command's entry point: `haguard run` first pets a watchdog the previous agent
left armed (agent/earlypet.py), before the imports that can take most of its timeout."""

from __future__ import annotations

import sys


def main() -> int:
    if sys.argv[1:2] == ["run"]:
        from haguard.agent.earlypet import config_in, pet_left_armed
        petted = pet_left_armed(config_in(sys.argv[2:]))
        if petted is not None:
            print(f"haguard: {petted}: the previous agent left it armed; petted", file=sys.stderr)
    from haguard.cli import main as cli_main
    return cli_main()
