from imtune.cli import main

raise SystemExit(main())
