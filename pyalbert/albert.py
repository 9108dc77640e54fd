"""``python pyalbert/albert.py ...``: the invocation the original Albert docs use."""

import os
import sys

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    # Run as a script, Python puts pyalbert/ first on the path: use the repo root instead.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))
    from pyalbert.cli import run

    run()
