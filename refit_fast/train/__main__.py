"""``python -m refit_fast.train CONFIG.yaml key=value ...`` (and the same under torchrun)."""
import sys

from refit_fast.train.cli import main

sys.exit(main())
