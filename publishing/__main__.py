"""``python -m bnpublish``: write the student tree."""
import sys

from bnpublish import main

sys.exit(main())
