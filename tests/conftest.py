import os
import sys

# tests/workers.py is a helper module, imported as `workers` by the test files.
sys.path.insert(0, os.path.dirname(__file__))
