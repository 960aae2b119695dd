from kdrepro.cli import main

raise SystemExit(main())
