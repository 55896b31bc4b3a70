from haguard.entry import main

raise SystemExit(main())
