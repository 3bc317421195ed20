from fastimp.cli import main

raise SystemExit(main())
