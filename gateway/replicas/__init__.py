"""Several gateway processes together: everything that goes through Redis."""
