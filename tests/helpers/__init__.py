"""What the tests share that is not a fixture (fixtures are in tests/conftest.py).

Test modules import from here (`from helpers.rpc import create`), never from conftest or
from one another. tests/ is on sys.path (pytest's `pythonpath` setting in pyproject.toml).
"""
