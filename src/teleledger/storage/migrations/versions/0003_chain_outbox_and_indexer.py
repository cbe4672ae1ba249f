"""chain outbox, indexer cursor and projected events (ledger.chain)

Revision ID: 0003
Revises: 0002
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # keep in step with teleledger.ledger.chain.storage
    op.create_table('chain_outbox',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=False),
    sa.Column('contract', sa.String(length=64), nullable=False),
    sa.Column('fn', sa.String(length=64), nullable=False),
    sa.Column('args', sa.Text(), nullable=False),
    sa.Column('sender', sa.String(length=160), nullable=False),
    sa.Column('status', sa.String(length=8), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.BigInteger(), nullable=False),
    sa.Column('nonce', sa.BigInteger(), nullable=True),
    sa.Column('tx_hash', sa.String(length=66), nullable=True),
    sa.Column('raw_tx', sa.LargeBinary(), nullable=True),
    sa.Column('block_number', sa.BigInteger(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created', sa.BigInteger(), nullable=False),
    sa.Column('updated', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('idempotency_key'),
    sqlite_autoincrement=True
    )
    with op.batch_alter_table('chain_outbox', schema=None) as batch_op:
        batch_op.create_index('ix_chain_outbox_open', ['status', 'sender', 'id'], unique=False)
        batch_op.create_index('ix_chain_outbox_kind', ['kind', 'id'], unique=False)

    op.create_table('chain_cursor',
    sa.Column('name', sa.String(length=32), nullable=False),
    sa.Column('block_number', sa.BigInteger(), nullable=False),
    sa.Column('block_hash', sa.String(length=66), nullable=False),
    sa.Column('updated', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('chain_blocks',
    sa.Column('number', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('hash', sa.String(length=66), nullable=False),
    sa.PrimaryKeyConstraint('number')
    )
    op.create_table('chain_events',
    sa.Column('block_number', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('log_index', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('tx_hash', sa.String(length=66), nullable=False),
    sa.Column('contract', sa.String(length=64), nullable=False),
    sa.Column('address', sa.String(length=42), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=True),
    sa.Column('args', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('block_number', 'log_index')
    )
    with op.batch_alter_table('chain_events', schema=None) as batch_op:
        batch_op.create_index('ix_chain_events_name', ['name', 'block_number'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('chain_events', schema=None) as batch_op:
        batch_op.drop_index('ix_chain_events_name')
    op.drop_table('chain_events')
    op.drop_table('chain_blocks')
    op.drop_table('chain_cursor')
    with op.batch_alter_table('chain_outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_chain_outbox_kind')
        batch_op.drop_index('ix_chain_outbox_open')
    op.drop_table('chain_outbox')
