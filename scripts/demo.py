"""`make demo`: a web page for any run (``anyloom.demo.app``).

    python scripts/demo.py --run runs/world --port 7860
"""

import sys

from anyloom.demo.app import main

if __name__ == "__main__":
    sys.exit(main())
