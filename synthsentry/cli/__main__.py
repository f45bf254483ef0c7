from synthsentry.cli import main

raise SystemExit(main())
