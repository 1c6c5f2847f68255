import sys

from thaw.cli import main

sys.exit(main())
