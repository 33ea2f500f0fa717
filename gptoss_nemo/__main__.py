from gptoss_nemo.cli import main

raise SystemExit(main())
