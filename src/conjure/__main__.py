import sys

from conjure.cli import main

sys.exit(main())
