"""Open-loop load generation against `matcher serve`, and its report."""
