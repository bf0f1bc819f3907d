"""The dealer daemon: `python parties/dealer.py --config party.toml` (same as
`secfwt party dealer`)."""

import sys

from secfwt.roles import Role
from secfwt.server.cli import party_main

if __name__ == "__main__":
    sys.exit(party_main(Role.DEALER))
