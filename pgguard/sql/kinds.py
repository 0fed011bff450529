"""What each kind of statement is, before looking inside it.

Owns: `STATEMENT_KINDS`, the map from every pglast statement node type to the categories the
statement has by its kind alone, with the reason shown to reviewers. `classify.py` refines this
(COPY direction, ALTER TABLE subcommands, SET of particular settings, DROP POLICY, ...).

Invariant: every `*Stmt` node type pglast knows is listed (a test enforces it); a kind that is
missing anyway (a newer pglast) is treated as `ddl` by `categories_of_kind`, never as harmless.
"""

from __future__ import annotations

from typing import Final

EXPORT: Final = "export"
DDL: Final = "ddl"
PRIVILEGE: Final = "privilege"
EXECUTE: Final = "execute"
ADMIN: Final = "admin"
UNPARSEABLE: Final = "unparseable"

PRIVILEGED_CATEGORIES: Final = (EXPORT, DDL, PRIVILEGE, EXECUTE, ADMIN)
ALL_CATEGORIES: Final = (*PRIVILEGED_CATEGORIES, UNPARSEABLE)

_NONE: tuple[tuple[str, ...], str] = ((), "")


def _ddl(what: str) -> tuple[tuple[str, ...], str]:
    return (DDL,), f"{what} changes the schema"


def _priv(what: str) -> tuple[tuple[str, ...], str]:
    return (PRIVILEGE,), f"{what} changes who may do what"


STATEMENT_KINDS: Final[dict[str, tuple[tuple[str, ...], str]]] = {
    # Reads, DML, transaction control, cursors, session chatter: not privileged by kind.
    "SelectStmt": _NONE,
    "InsertStmt": _NONE,
    "UpdateStmt": _NONE,
    "DeleteStmt": _NONE,
    "MergeStmt": _NONE,
    "SetOperationStmt": _NONE,
    "ReturnStmt": _NONE,
    "PLAssignStmt": _NONE,
    "CallStmt": _NONE,
    "TransactionStmt": _NONE,
    "DeclareCursorStmt": _NONE,
    "FetchStmt": _NONE,
    "ClosePortalStmt": _NONE,
    "ListenStmt": _NONE,
    "UnlistenStmt": _NONE,
    "NotifyStmt": _NONE,
    "LockStmt": _NONE,
    "ConstraintsSetStmt": _NONE,
    "VariableSetStmt": _NONE,
    "VariableShowStmt": _NONE,
    "ExplainStmt": _NONE,
    "PrepareStmt": _NONE,
    "ExecuteStmt": _NONE,
    "DeallocateStmt": _NONE,
    "DiscardStmt": _NONE,
    "VacuumStmt": _NONE,
    "ClusterStmt": _NONE,
    "ReindexStmt": _NONE,
    "CopyStmt": _NONE,
    "RawStmt": _NONE,
    # Code the proxy cannot see into.
    "DoStmt": ((EXECUTE,), "DO runs an anonymous code block"),
    "LoadStmt": ((EXECUTE,), "LOAD loads a shared library into the server"),
    # Administration of the server itself.
    "AlterSystemStmt": ((ADMIN,), "ALTER SYSTEM changes the server configuration"),
    "CheckPointStmt": ((ADMIN,), "CHECKPOINT forces a checkpoint"),
    "CreateTableSpaceStmt": ((ADMIN, DDL), "CREATE TABLESPACE uses server storage"),
    "DropTableSpaceStmt": ((ADMIN, DDL), "DROP TABLESPACE removes server storage"),
    "AlterTableSpaceOptionsStmt": ((ADMIN, DDL), "ALTER TABLESPACE changes server storage"),
    "AlterTableMoveAllStmt": ((ADMIN, DDL), "ALTER ... SET TABLESPACE moves storage"),
    "CreatedbStmt": ((ADMIN, DDL), "CREATE DATABASE creates a database"),
    "DropdbStmt": ((ADMIN, DDL), "DROP DATABASE removes a database"),
    "AlterDatabaseStmt": ((ADMIN, DDL), "ALTER DATABASE changes a database"),
    "AlterDatabaseSetStmt": ((ADMIN, DDL), "ALTER DATABASE SET changes a database's defaults"),
    "AlterDatabaseRefreshCollStmt": ((ADMIN, DDL), "ALTER DATABASE REFRESH changes a database"),
    # Privileges, roles, ownership, row-level security.
    "GrantStmt": _priv("GRANT/REVOKE"),
    "GrantRoleStmt": _priv("GRANT/REVOKE of a role"),
    "CreateRoleStmt": _priv("CREATE ROLE/USER/GROUP"),
    "AlterRoleStmt": _priv("ALTER ROLE/USER/GROUP"),
    "AlterRoleSetStmt": _priv("ALTER ROLE ... SET"),
    "DropRoleStmt": _priv("DROP ROLE/USER/GROUP"),
    "AlterDefaultPrivilegesStmt": _priv("ALTER DEFAULT PRIVILEGES"),
    "AlterOwnerStmt": _priv("ALTER ... OWNER TO"),
    "ReassignOwnedStmt": _priv("REASSIGN OWNED"),
    "DropOwnedStmt": ((PRIVILEGE, DDL), "DROP OWNED drops objects and revokes privileges"),
    "CreatePolicyStmt": _priv("CREATE POLICY (row-level security)"),
    "AlterPolicyStmt": _priv("ALTER POLICY (row-level security)"),
    "CreateUserMappingStmt": ((PRIVILEGE, DDL), "CREATE USER MAPPING stores remote credentials"),
    "AlterUserMappingStmt": ((PRIVILEGE, DDL), "ALTER USER MAPPING changes remote credentials"),
    "DropUserMappingStmt": ((PRIVILEGE, DDL), "DROP USER MAPPING removes remote credentials"),
    # Schema changes.
    "CreateStmt": _ddl("CREATE TABLE"),
    "CreateTableAsStmt": _ddl("CREATE TABLE AS / SELECT INTO / CREATE MATERIALIZED VIEW"),
    "AlterTableStmt": _ddl("ALTER TABLE"),
    "DropStmt": _ddl("DROP"),
    "TruncateStmt": _ddl("TRUNCATE"),
    "CommentStmt": _ddl("COMMENT ON"),
    "IndexStmt": _ddl("CREATE INDEX"),
    "CreateSchemaStmt": _ddl("CREATE SCHEMA"),
    "ViewStmt": _ddl("CREATE VIEW"),
    "RefreshMatViewStmt": _ddl("REFRESH MATERIALIZED VIEW"),
    "SecLabelStmt": _ddl("SECURITY LABEL"),
    "ImportForeignSchemaStmt": ((DDL, EXPORT), "IMPORT FOREIGN SCHEMA links a remote server"),
    "CreateSeqStmt": _ddl("CREATE SEQUENCE"),
    "AlterSeqStmt": _ddl("ALTER SEQUENCE"),
    "CreateDomainStmt": _ddl("CREATE DOMAIN"),
    "AlterDomainStmt": _ddl("ALTER DOMAIN"),
    "CreateExtensionStmt": ((DDL, EXECUTE), "CREATE EXTENSION runs an extension's scripts"),
    "AlterExtensionStmt": ((DDL, EXECUTE), "ALTER EXTENSION runs an extension's scripts"),
    "AlterExtensionContentsStmt": _ddl("ALTER EXTENSION ADD/DROP"),
    "CreateFdwStmt": ((DDL, EXECUTE), "CREATE FOREIGN DATA WRAPPER installs handler code"),
    "AlterFdwStmt": ((DDL, EXECUTE), "ALTER FOREIGN DATA WRAPPER changes handler code"),
    "CreateForeignServerStmt": ((DDL, EXPORT), "CREATE SERVER defines a remote server"),
    "AlterForeignServerStmt": ((DDL, EXPORT), "ALTER SERVER changes a remote server"),
    "CreateForeignTableStmt": ((DDL, EXPORT), "CREATE FOREIGN TABLE links remote data"),
    "CreateFunctionStmt": _ddl("CREATE FUNCTION/PROCEDURE"),
    "AlterFunctionStmt": _ddl("ALTER FUNCTION/PROCEDURE"),
    "CreateTrigStmt": _ddl("CREATE TRIGGER"),
    "CreateEventTrigStmt": _ddl("CREATE EVENT TRIGGER"),
    "AlterEventTrigStmt": _ddl("ALTER EVENT TRIGGER"),
    "RuleStmt": _ddl("CREATE RULE"),
    "CreatePLangStmt": ((DDL, EXECUTE), "CREATE LANGUAGE installs a language handler"),
    "CompositeTypeStmt": _ddl("CREATE TYPE"),
    "CreateEnumStmt": _ddl("CREATE TYPE ... AS ENUM"),
    "AlterEnumStmt": _ddl("ALTER TYPE (enum)"),
    "CreateRangeStmt": _ddl("CREATE TYPE ... AS RANGE"),
    "AlterTypeStmt": _ddl("ALTER TYPE"),
    "DefineStmt": _ddl("CREATE AGGREGATE/OPERATOR/TYPE/COLLATION/TEXT SEARCH"),
    "CreateCastStmt": _ddl("CREATE CAST"),
    "CreateOpClassStmt": _ddl("CREATE OPERATOR CLASS"),
    "CreateOpFamilyStmt": _ddl("CREATE OPERATOR FAMILY"),
    "AlterOpFamilyStmt": _ddl("ALTER OPERATOR FAMILY"),
    "AlterOperatorStmt": _ddl("ALTER OPERATOR"),
    "CreateConversionStmt": _ddl("CREATE CONVERSION"),
    "CreateTransformStmt": _ddl("CREATE TRANSFORM"),
    "CreateAmStmt": _ddl("CREATE ACCESS METHOD"),
    "CreateStatsStmt": _ddl("CREATE STATISTICS"),
    "AlterStatsStmt": _ddl("ALTER STATISTICS"),
    "RenameStmt": _ddl("ALTER ... RENAME"),
    "AlterObjectSchemaStmt": _ddl("ALTER ... SET SCHEMA"),
    "AlterObjectDependsStmt": _ddl("ALTER ... DEPENDS ON EXTENSION"),
    "AlterTSDictionaryStmt": _ddl("ALTER TEXT SEARCH DICTIONARY"),
    "AlterTSConfigurationStmt": _ddl("ALTER TEXT SEARCH CONFIGURATION"),
    "AlterCollationStmt": _ddl("ALTER COLLATION"),
    "ReplicaIdentityStmt": _ddl("ALTER TABLE ... REPLICA IDENTITY"),
    "CreatePublicationStmt": ((DDL, EXPORT), "CREATE PUBLICATION publishes table changes"),
    "AlterPublicationStmt": ((DDL, EXPORT), "ALTER PUBLICATION changes what is published"),
    "CreateSubscriptionStmt": ((DDL, ADMIN), "CREATE SUBSCRIPTION starts replication"),
    "AlterSubscriptionStmt": ((DDL, ADMIN), "ALTER SUBSCRIPTION changes replication"),
    "DropSubscriptionStmt": ((DDL, ADMIN), "DROP SUBSCRIPTION stops replication"),
}

_UNKNOWN_KIND = ((DDL,), "statement kind unknown to pgguard")


def categories_of_kind(kind: str) -> tuple[tuple[str, ...], str]:
    """(categories, reason) a statement has by its kind alone; unknown kinds count as ddl."""
    return STATEMENT_KINDS.get(kind, _UNKNOWN_KIND)
