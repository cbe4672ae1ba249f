"""care relationships as a fact table

Revision ID: 0012
Revises: 0011

``care_relationships`` (``records.care_tables``): one row per (practitioner, patient) with a
care relationship, i.e. a current Encounter, Appointment or CareTeam naming
``Practitioner/<id>`` as practitioner, participant or actor with the patient in its
compartment. Backfilled here from the search index, which holds exactly the current versions;
from now on kept in step with every write by the record store's change hook.
"""

from alembic import op
import sqlalchemy as sa


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

# written out rather than imported: a migration must keep doing what it did when the code moves
_BACKFILL = (
    "INSERT INTO care_relationships (practitioner_id, patient_id) "
    "SELECT DISTINCT ref.target_id, comp.patient_id FROM idx_reference ref "
    "JOIN resource_compartments comp ON comp.res_type = ref.res_type AND comp.res_id = ref.res_id "
    "WHERE ref.res_type IN ('Encounter', 'Appointment', 'CareTeam') "
    "AND ref.param IN ('practitioner', 'participant', 'actor') AND ref.target_type = 'Practitioner'"
)


def upgrade() -> None:
    op.create_table(
        'care_relationships',
        sa.Column('practitioner_id', sa.String(length=64), nullable=False),
        sa.Column('patient_id', sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint('practitioner_id', 'patient_id'),
    )
    op.execute(_BACKFILL)


def downgrade() -> None:
    op.drop_table('care_relationships')
