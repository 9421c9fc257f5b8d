"""The app's three tables as Prisma creates them, for the demo, the tests and the benchmark.

The tool itself never creates these: it only binds the columns it needs (db.bind_table).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

# Prisma's DateTime: timestamp(3) without time zone, holding UTC.
PrismaDateTime = sa.DateTime().with_variant(postgresql.TIMESTAMP(precision=3), "postgresql")
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def app_metadata(settings=None, schema: str | None = None) -> sa.MetaData:
    """Tables named as the settings say (defaults: Prisma's names)."""

    def name(setting: str, default: str) -> str:
        return getattr(settings, setting, default) if settings is not None else default

    metadata = sa.MetaData(schema=schema)
    ik = name("idempotency_key_table", "IdempotencyKey")
    ik_expires = name("idempotency_key_expires_at_column", "expiresAt")
    sa.Table(
        ik, metadata,
        sa.Column(name("idempotency_key_id_column", "id"), sa.Text, primary_key=True),
        sa.Column("key", sa.Text, nullable=False, unique=True),
        sa.Column("accountId", sa.Text, nullable=False),
        sa.Column("endpoint", sa.Text, nullable=False),
        sa.Column("method", sa.Text, nullable=False),
        sa.Column("requestBody", Json),
        sa.Column(name("idempotency_key_status_code_column", "statusCode"), sa.Integer),
        sa.Column("responseBody", Json),
        sa.Column(name("idempotency_key_created_at_column", "createdAt"), PrismaDateTime,
                  nullable=False, server_default=sa.func.current_timestamp()),
        sa.Column(ik_expires, PrismaDateTime, nullable=False),
        sa.Index(f"{ik}_{ik_expires}_idx", ik_expires),
    )
    rt = name("refresh_token_table", "RefreshToken")
    rt_expires = name("refresh_token_expires_at_column", "expiresAt")
    rt_revoked = name("refresh_token_revoked_at_column", "revokedAt")
    sa.Table(
        rt, metadata,
        sa.Column(name("refresh_token_id_column", "id"), sa.Text, primary_key=True),
        sa.Column("token", sa.Text, nullable=False, unique=True),
        sa.Column("userAccountId", sa.Text, nullable=False),
        sa.Column("accountId", sa.Text, nullable=False),
        sa.Column("ipAddress", sa.Text),
        sa.Column("userAgent", sa.Text),
        sa.Column("deviceInfo", Json),
        sa.Column(rt_expires, PrismaDateTime, nullable=False),
        sa.Column(rt_revoked, PrismaDateTime),
        sa.Column("revokedReason", sa.Text),
        sa.Column("lastUsedAt", PrismaDateTime),
        sa.Column("createdAt", PrismaDateTime, nullable=False, server_default=sa.func.current_timestamp()),
        sa.Column("updatedAt", PrismaDateTime, nullable=False, server_default=sa.func.current_timestamp()),
        sa.Index(f"{rt}_{rt_expires}_idx", rt_expires),
        sa.Index(f"{rt}_{rt_revoked}_idx", rt_revoked),
    )
    ml = name("magic_link_table", "MagicLink")
    sa.Table(
        ml, metadata,
        sa.Column(name("magic_link_id_column", "id"), sa.Text, primary_key=True),
        sa.Column("email", sa.Text, nullable=False, index=True),
        sa.Column("token", sa.Text, nullable=False, unique=True),
        sa.Column(name("magic_link_used_column", "used"), sa.Boolean, nullable=False,
                  server_default=sa.false()),
        sa.Column(name("magic_link_expires_at_column", "expiresAt"), PrismaDateTime, nullable=False),
        sa.Column("createdAt", PrismaDateTime, nullable=False, server_default=sa.func.current_timestamp()),
    )
    return metadata
