import sys

from gateway.loadtest.cli import main

sys.exit(main())
