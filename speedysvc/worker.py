"""``python -m speedysvc.worker TARGET [SERVICE]``: a worker process (see ``speedysvc.shm.worker``)."""
import sys

from .shm.worker import main

if __name__ == "__main__":
    sys.exit(main())
