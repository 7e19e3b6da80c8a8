"""`make import`: a released checkpoint -> a run directory (``anyloom.pretrained.importer``).

    python scripts/import.py --from chameleon --src path/to/chameleon-7b --run runs/chameleon
"""

import sys

from anyloom.pretrained.importer import main

if __name__ == "__main__":
    sys.exit(main())
