from dsmr_logger.cli import main

raise SystemExit(main())
