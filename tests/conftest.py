pytest_plugins = ["tests.engine.conftest"]
