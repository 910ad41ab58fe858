import sys
from pathlib import Path

# spawned ranks import the worker functions from this folder
sys.path.insert(0, str(Path(__file__).parent))
