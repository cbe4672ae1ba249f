"""e-prescriptions (prescriptions)

Revision ID: 0007
Revises: 0006

Tables of ``teleledger.prescriptions.tables``: ``rx_prescriptions`` (a MedicationRequest's
chain hash, salt and token), ``rx_members`` (chain memberships asked for), ``rx_shares``
(pharmacies a patient sent a prescription to).
"""

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'rx_prescriptions',
        sa.Column('rx_id', sa.String(length=64), nullable=False),
        sa.Column('rx_hash', sa.String(length=66), nullable=False),
        sa.Column('salt', sa.LargeBinary(), nullable=False),
        sa.Column('token', sa.Text(), nullable=False),
        sa.Column('patient_id', sa.String(length=64), nullable=False),
        sa.Column('prescriber', sa.String(length=128), nullable=False),
        sa.Column('created', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('rx_id'),
        sa.UniqueConstraint('rx_hash'),
    )
    with op.batch_alter_table('rx_prescriptions', schema=None) as batch_op:
        batch_op.create_index('ix_rx_prescriptions_patient', ['patient_id'], unique=False)
    op.create_table(
        'rx_members',
        sa.Column('username', sa.String(length=128), nullable=False),
        sa.Column('org', sa.String(length=128), nullable=False),
        sa.Column('roles', sa.Integer(), nullable=False),
        sa.Column('created', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('username', 'org'),
    )
    op.create_table(
        'rx_shares',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('rx_id', sa.String(length=64), nullable=False),
        sa.Column('pharmacy', sa.String(length=128), nullable=False),
        sa.Column('patient_id', sa.String(length=64), nullable=False),
        sa.Column('created', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('rx_shares', schema=None) as batch_op:
        batch_op.create_index('ix_rx_shares_rx', ['rx_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('rx_shares', schema=None) as batch_op:
        batch_op.drop_index('ix_rx_shares_rx')
    op.drop_table('rx_shares')
    op.drop_table('rx_members')
    with op.batch_alter_table('rx_prescriptions', schema=None) as batch_op:
        batch_op.drop_index('ix_rx_prescriptions_patient')
    op.drop_table('rx_prescriptions')
