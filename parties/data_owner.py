"""The data owner daemon: `python parties/data_owner.py --config party.toml` (same as
`secfwt party data-owner`)."""

import sys

from secfwt.roles import Role
from secfwt.server.cli import party_main

if __name__ == "__main__":
    sys.exit(party_main(Role.DATA_OWNER))
