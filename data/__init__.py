"""MNIST, shipped in ``MNIST/raw/`` and checked on every load (``data.mnist``)."""


class DataError(Exception):
    """A missing or corrupt data file, or a data folder that holds none: one line naming the file
    and the fix. The entry points print it like a usage error (exit code 2, no traceback)."""
