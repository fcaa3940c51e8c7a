from dermq_client.cli import main

raise SystemExit(main())
