"""`python -m mvdit.refvec FILE...`: check this implementation against upstream's reference vectors."""

import sys

from mvdit.refvec.check import main

sys.exit(main())
