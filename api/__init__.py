"""dermq's HTTP surface (FastAPI). Never imports torch or the worker: see DESIGN.md."""
