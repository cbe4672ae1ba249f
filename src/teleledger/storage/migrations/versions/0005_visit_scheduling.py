"""visit scheduling: slot bookings (visits.scheduling)

Revision ID: 0005
Revises: 0004
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # teleledger.visits.tables.slot_bookings: the primary key on slot_id is the guarantee
    # against double booking
    op.create_table('slot_bookings',
    sa.Column('slot_id', sa.String(length=64), nullable=False),
    sa.Column('appointment_id', sa.String(length=64), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('booked', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('slot_id'),
    sa.UniqueConstraint('appointment_id')
    )
    with op.batch_alter_table('slot_bookings', schema=None) as batch_op:
        batch_op.create_index('ix_slot_bookings_patient', ['patient_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('slot_bookings', schema=None) as batch_op:
        batch_op.drop_index('ix_slot_bookings_patient')
    op.drop_table('slot_bookings')
