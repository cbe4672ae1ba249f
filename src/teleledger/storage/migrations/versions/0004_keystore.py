"""encrypted secp256k1 keystore (identity.keystore)

Revision ID: 0004
Revises: 0003
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # keep in step with teleledger.identity.keystore.keystore
    op.create_table('keystore',
    sa.Column('key_id', sa.String(length=160), nullable=False),
    sa.Column('address', sa.String(length=42), nullable=False),
    sa.Column('sealed', sa.LargeBinary(), nullable=False),
    sa.Column('created', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('key_id')
    )
    with op.batch_alter_table('keystore', schema=None) as batch_op:
        batch_op.create_index('ix_keystore_address', ['address'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('keystore', schema=None) as batch_op:
        batch_op.drop_index('ix_keystore_address')
    op.drop_table('keystore')
