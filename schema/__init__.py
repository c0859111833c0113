"""The SQL the rest stands on: numbered migrations and the code that applies them."""
