"""``python -m lora_numpy``: see cli.py."""
import sys

from .cli import main

sys.exit(main())
