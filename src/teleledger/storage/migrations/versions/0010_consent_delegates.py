"""delegates for patient consent (parents, guardians, caregivers)

Revision ID: 0010
Revises: 0009

``consent_delegates`` of ``teleledger.policy.delegate_tables``: each RelatedPerson a patient
designated to act for them, the delegate account's chain address, the patient's last request
and the last ``DelegateSet`` event of ConsentRegistry projected for it.
"""

from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'consent_delegates',
        sa.Column('delegation_id', sa.String(length=32), nullable=False),
        sa.Column('patient_id', sa.String(length=64), nullable=False),
        sa.Column('related_person_id', sa.String(length=64), nullable=False),
        sa.Column('account_id', sa.String(length=64), nullable=False),
        sa.Column('address', sa.String(length=42), nullable=False),
        sa.Column('pseudonym', sa.String(length=66), nullable=False),
        sa.Column('requested', sa.Boolean(), nullable=False),
        sa.Column('outbox_key', sa.String(length=200), nullable=False),
        sa.Column('on_chain', sa.Boolean(), nullable=True),
        sa.Column('block_number', sa.BigInteger(), nullable=True),
        sa.Column('log_index', sa.Integer(), nullable=True),
        sa.Column('tx_hash', sa.String(length=66), nullable=True),
        sa.Column('created', sa.BigInteger(), nullable=False),
        sa.Column('updated', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('delegation_id'),
        sa.UniqueConstraint('patient_id', 'related_person_id', name='uq_consent_delegates_patient_rp'),
    )
    op.create_index('ix_consent_delegates_chain_key', 'consent_delegates', ['pseudonym', 'address'])
    op.create_index('ix_consent_delegates_account', 'consent_delegates', ['account_id'])


def downgrade() -> None:
    op.drop_index('ix_consent_delegates_account', table_name='consent_delegates')
    op.drop_index('ix_consent_delegates_chain_key', table_name='consent_delegates')
    op.drop_table('consent_delegates')
