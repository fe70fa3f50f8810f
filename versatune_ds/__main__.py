from versatune_ds.cli import main

raise SystemExit(main())
