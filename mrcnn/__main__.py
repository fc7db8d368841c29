from mrcnn.cli import main

raise SystemExit(main())
