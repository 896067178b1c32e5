"""``python -m mmshiftkv.evaluation``: the ``mmshiftkv eval`` command (accelerate/torchrun friendly)."""

import sys

from mmshiftkv.evaluation.cli import eval_main

sys.exit(eval_main())
