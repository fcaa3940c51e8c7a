#!/bin/sh
# Runs once, when the postgres container initialises an empty data volume (docker-entrypoint-initdb.d).
# Creates the owner role (migrations: owns every table) and the runtime role (api, workers: INSERT and
# SELECT only on the audit tables, granted by `dermq db upgrade` with DERMQ_DATABASE_RUNTIME_ROLE), and
# hands the database to the owner. The bootstrap superuser (POSTGRES_USER) is used for nothing else.
set -eu
owner_password=$(cat /run/secrets/postgres_owner_password)
app_password=$(cat /run/secrets/postgres_app_password)
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v owner_password="$owner_password" -v app_password="$app_password" <<'SQL'
CREATE ROLE dermq_owner LOGIN NOSUPERUSER NOCREATEROLE NOBYPASSRLS PASSWORD :'owner_password';
CREATE ROLE dermq_app LOGIN NOSUPERUSER NOCREATEROLE NOBYPASSRLS PASSWORD :'app_password';
ALTER ROLE dermq_app SET idle_in_transaction_session_timeout = '60s';
SELECT format('ALTER DATABASE %I OWNER TO dermq_owner', current_database()) \gexec
SELECT format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database()) \gexec
SQL
