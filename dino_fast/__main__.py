"""``python -m dino_fast ...`` is ``dino-fast ...``."""
import sys

from dino_fast.cli import main

sys.exit(main())
