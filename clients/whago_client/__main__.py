"""`python -m whago_client`: the operator CLI."""

import sys

from whago_client.cli import main

if __name__ == "__main__":
    sys.exit(main())
