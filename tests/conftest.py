"""Makes `tests/reference.py` (the diffusers/transformers references) importable as `reference` whatever pytest's
import mode, and the repository root importable as `ldm` when the package is not installed."""
import sys
from pathlib import Path

for path in (Path(__file__).parent, Path(__file__).parents[1]):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
