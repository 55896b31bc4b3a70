from haguard.cli import main

raise SystemExit(main())
