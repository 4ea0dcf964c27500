"""The `fire` command line (the top rank: nothing imports it)."""
