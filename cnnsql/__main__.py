import sys

from cnnsql.cli.main import main

sys.exit(main())
