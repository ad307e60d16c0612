import sys

from backhaul.cli import main

sys.exit(main())
