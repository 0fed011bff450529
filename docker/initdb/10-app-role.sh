#!/bin/sh
# Runs once, when the postgres container initialises its data directory.
# The role agents act as through pgguard: an ordinary role that owns the application's database,
# never a superuser - pgguard refuses to start when its upstream role can reach pgguard's state.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v app_password="$APP_PASSWORD" <<'SQL'
CREATE ROLE app LOGIN PASSWORD :'app_password';
CREATE DATABASE app OWNER app;
SQL
