"""Database operations, one module per resource. Functions take keyword arguments and a session."""
