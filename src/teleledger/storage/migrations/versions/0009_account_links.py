"""account links to an Organization and a RelatedPerson; break-glass claims by organization

Revision ID: 0009
Revises: 0008

``users.organization_id``: the Organization a member acts for (a consent naming the organization
reaches its members); ``users.related_person_id``: the RelatedPerson a delegate acts as.
``break_glass_claims.organization_id`` (the claimant's organization, for its privacy officer) and
``reason_sealed`` (the written reason, AES-GCM under the patient's data key, never in clear).
"""

from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('users') as batch:
        batch.add_column(sa.Column('organization_id', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('related_person_id', sa.String(length=64), nullable=True))
    with op.batch_alter_table('break_glass_claims') as batch:
        batch.add_column(sa.Column('organization_id', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('reason_sealed', sa.LargeBinary(), nullable=True))
    op.create_index('ix_break_glass_organization', 'break_glass_claims', ['organization_id'])


def downgrade() -> None:
    op.drop_index('ix_break_glass_organization', table_name='break_glass_claims')
    with op.batch_alter_table('break_glass_claims') as batch:
        batch.drop_column('reason_sealed')
        batch.drop_column('organization_id')
    with op.batch_alter_table('users') as batch:
        batch.drop_column('related_person_id')
        batch.drop_column('organization_id')
