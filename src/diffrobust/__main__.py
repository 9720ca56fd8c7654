from diffrobust.cli import main

raise SystemExit(main())
