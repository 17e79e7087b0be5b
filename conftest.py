"""Root conftest: kept thin on purpose. The plugin itself is registered through the ``pytest11``
entry point (see pyproject.toml), so installing circuit-tests is all a user needs."""
