import sys

from bngrade.pipeline.cli import main

sys.exit(main())
