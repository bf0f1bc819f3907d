def main() -> int:  # placeholder until the CLI lands
    raise SystemExit("not yet")
