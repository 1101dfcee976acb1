"""``python -m inference_client``: the terminal chat."""
import sys

from .chat import main

sys.exit(main())
