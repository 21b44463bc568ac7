"""`python -m driverscore`: the same as the `driverscore` command."""

from driverscore.cli import main

if __name__ == "__main__":
    main()
