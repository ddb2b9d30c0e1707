import os
import sys

# Tests import the helpers in tests/ (tiny.py) and the project from the repo root.
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
