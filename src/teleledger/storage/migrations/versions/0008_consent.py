"""patient consent (policy.service)

Revision ID: 0008
Revises: 0007

Tables of ``teleledger.policy.consent_tables``: ``consent_patients`` (pseudonym and EIP-712
nonce of each patient bound on chain), ``consent_grants`` (the Consent version and grantee
behind each ConsentRegistry key), ``break_glass_claims``.
"""

from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'consent_patients',
        sa.Column('patient_id', sa.String(length=64), nullable=False),
        sa.Column('pseudonym', sa.String(length=66), nullable=False),
        sa.Column('next_nonce', sa.BigInteger(), nullable=False),
        sa.Column('created', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('patient_id'),
        sa.UniqueConstraint('pseudonym'),
    )
    op.create_table(
        'consent_grants',
        sa.Column('consent_id', sa.String(length=64), nullable=False),
        sa.Column('consent_version', sa.Integer(), nullable=False),
        sa.Column('grantee_ref', sa.String(length=200), nullable=False),
        sa.Column('patient_id', sa.String(length=64), nullable=False),
        sa.Column('pseudonym', sa.String(length=66), nullable=False),
        sa.Column('grantee_h', sa.String(length=66), nullable=False),
        sa.Column('provision_hash', sa.String(length=66), nullable=False),
        sa.Column('salt', sa.LargeBinary(), nullable=False),
        sa.Column('valid_from', sa.BigInteger(), nullable=False),
        sa.Column('valid_until', sa.BigInteger(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('created', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('consent_id', 'consent_version', 'grantee_ref'),
    )
    op.create_index('ix_consent_grants_chain_key', 'consent_grants', ['pseudonym', 'grantee_h', 'provision_hash'])
    op.create_index('ix_consent_grants_patient', 'consent_grants', ['patient_id'])
    op.create_table(
        'break_glass_claims',
        sa.Column('claim_id', sa.String(length=64), nullable=False),
        sa.Column('practitioner_id', sa.String(length=64), nullable=False),
        sa.Column('patient_id', sa.String(length=64), nullable=False),
        sa.Column('started', sa.BigInteger(), nullable=False),
        sa.Column('expires', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('claim_id'),
    )
    op.create_index('ix_break_glass_patient', 'break_glass_claims', ['patient_id'])


def downgrade() -> None:
    op.drop_index('ix_break_glass_patient', table_name='break_glass_claims')
    op.drop_table('break_glass_claims')
    op.drop_index('ix_consent_grants_patient', table_name='consent_grants')
    op.drop_index('ix_consent_grants_chain_key', table_name='consent_grants')
    op.drop_table('consent_grants')
    op.drop_table('consent_patients')
