"""Consolidate a sharded DCP training checkpoint into inference weights (``anyloom.training.export``).

    python scripts/export.py --checkpoint runs/world/checkpoints/step_00001500 --out runs/world/export
    python scripts/export.py --run runs/world            # the latest complete checkpoint of the run
"""

import sys

from anyloom.training.export import main

if __name__ == "__main__":
    sys.exit(main())
