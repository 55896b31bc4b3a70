import sys

from haguard.sim.runner import main

sys.exit(main())
