"""The model owner daemon: `python parties/model_owner.py --config party.toml` (same as
`secfwt party model-owner`)."""

import sys

from secfwt.roles import Role
from secfwt.server.cli import party_main

if __name__ == "__main__":
    sys.exit(party_main(Role.MODEL_OWNER))
