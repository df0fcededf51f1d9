import sys
from pathlib import Path

# tests import their helpers (tiny_models, inputs, reference) as top-level modules
sys.path.insert(0, str(Path(__file__).parent))
