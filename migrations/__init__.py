"""dermq's Alembic migrations, shipped inside the package so `dermq db upgrade` works wherever dermq is
installed (``cli.db.alembic_config`` points Alembic here; ``alembic.ini`` at the repository root
does the same for developers)."""
