from bigl.cli import main

raise SystemExit(main())
