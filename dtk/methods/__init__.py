"""One module per paper: its objective as plain functions, and the ``Method`` the engine runs."""
