from chipspan.cli import main

raise SystemExit(main())
