"""API fixtures. The live uvicorn server (``live_api``) is in tests/conftest.py: tests/client uses it too."""
