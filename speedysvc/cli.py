"""``python -m speedysvc.cli``: the ``speedysvc`` command (see ``speedysvc.manager.cli``)."""
import sys

from .manager.cli import main

if __name__ == "__main__":
    sys.exit(main())
