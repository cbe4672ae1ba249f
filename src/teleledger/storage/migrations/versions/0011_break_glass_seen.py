"""break-glass notices the patient has seen

Revision ID: 0011
Revises: 0010

``break_glass_claims.seen_by_patient``: when (µs) the patient dismissed the portal's notice of
this claim; NULL while the notice is shown.
"""

from alembic import op
import sqlalchemy as sa


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('break_glass_claims') as batch:
        batch.add_column(sa.Column('seen_by_patient', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('break_glass_claims') as batch:
        batch.drop_column('seen_by_patient')
