"""python -m jaxlm.train: train a model; --help lists every field."""
import sys

from .cli import main

sys.exit(main())
