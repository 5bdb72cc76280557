"""``python3 -m speedysvc.service service.ini``: run the services of an ini file (see ``speedysvc.manager``)."""
import sys

from .manager import main

if __name__ == "__main__":
    sys.exit(main())
