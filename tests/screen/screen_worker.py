"""``persona-guard`` with every scoring batch slowed by ``$SCREEN_WORKER_DELAY`` seconds, for
tests/screen/test_sharded.py to kill a sharded screen midway (run under torch.distributed.run)."""

import os
import sys
import time

import guard.screen.scoring as scoring
from guard.cli.main import main

delay = float(os.environ.get("SCREEN_WORKER_DELAY", "0"))
real = scoring.project_batch


def slow(*args, **kwargs):
    time.sleep(delay)
    return real(*args, **kwargs)


if __name__ == "__main__":
    scoring.project_batch = slow
    sys.argv[0] = "persona-guard"
    main()
